//! `GstVideoOverlay` on `melangevideosink`: apps that give their video sink a window
//! (the X11 window id and the rectangle to draw in) give it to ours as to any other,
//! and the rectangle goes to melange-host, which sizes its window from it.
//!
//! gstreamer-rs has no subclassing support for this interface, so its two virtual
//! methods are filled in here; each hands the call to the element's [`Overlay`]
//! implementation.

use gstreamer::glib;
use gstreamer::glib::subclass::prelude::*;
use gstreamer_video as gst_video;
use gstreamer_video::ffi;

/// What the video sink does with an app's window.
pub trait Overlay: ObjectSubclass {
    /// The app draws the video at (`x`, `y`), `width` x `height` pixels of its window;
    /// -1 for all four: the whole window.
    fn set_render_rectangle(&self, x: i32, y: i32, width: i32, height: i32);

    /// The app's window (an X11 window id), 0 for none.
    fn set_window_handle(&self, handle: usize);
}

unsafe impl IsImplementable<crate::sink::video::Imp> for gst_video::VideoOverlay {
    fn interface_init(iface: &mut glib::Interface<Self>) {
        let iface = iface.as_mut();
        iface.set_render_rectangle = Some(set_render_rectangle::<crate::sink::video::Imp>);
        iface.set_window_handle = Some(set_window_handle::<crate::sink::video::Imp>);
    }
}

unsafe extern "C" fn set_render_rectangle<T: Overlay>(
    overlay: *mut ffi::GstVideoOverlay,
    x: i32,
    y: i32,
    width: i32,
    height: i32,
) {
    // SAFETY: GObject calls this only on instances of the type that implements the
    // interface, whose instance struct is `T::Instance`.
    let instance = unsafe { &*(overlay as *mut T::Instance) };
    instance.imp().set_render_rectangle(x, y, width, height);
}

unsafe extern "C" fn set_window_handle<T: Overlay>(overlay: *mut ffi::GstVideoOverlay, handle: usize) {
    // SAFETY: as in `set_render_rectangle`.
    let instance = unsafe { &*(overlay as *mut T::Instance) };
    instance.imp().set_window_handle(handle);
}
