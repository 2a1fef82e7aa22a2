//! The `melange` GStreamer plugin, for guest images: `melangevideosink` and
//! `melangeaudiosink` forward a player's own encoded video and audio, undecoded, to
//! melange-host through the guest's media broker (docs/guest.md, "Players").

pub mod forward;
mod overlay;
pub mod sink;

use gstreamer as gst;
use gstreamer::glib;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    sink::register(plugin)
}

gst::plugin_define!(
    melange,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    env!("CARGO_PKG_VERSION"),
    "MIT/X11",
    "gst-plugin-melange",
    "gst-plugin-melange",
    "https://example.invalid/melange"
);
