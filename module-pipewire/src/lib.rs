//! `libpipewire-module-melange`: the guest side of Melange as a PipeWire module.
//!
//! Loaded by its own `pipewire -c melange-guest.conf` process (never into the session's
//! daemon, so a crash here cannot take the desktop's audio down). It connects to the
//! session's PipeWire, makes sure its two sinks exist (the redirect sink, this process's
//! own and the default, and a lingering standby behind it), taps every app linked to
//! them, and hands each tap to `melange-guest`, whose thread encodes it and sends it over
//! the port to `melange-host` (with the players' streams of its media broker).
//!
//! This crate is the thin PipeWire adapter; codecs and rings live in `melange-shim`, the
//! connection in `melange-guest`. Which nodes are tapped is decided in [`policy`], without PipeWire;
//! `guest` feeds it the registry and carries out its decisions. Module arguments are
//! documented in [`config`].

// Tests fail by panicking; production code may not.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod camera;
mod camera_sink;
pub mod config;
mod guest;
mod mic;
pub mod policy;
mod sink;
mod stream;
mod tap;

use std::ffi::{c_char, c_int, c_void, CStr};

use pipewire::sys as pw_sys;

/// State the module owns between init and destroy.
struct Module {
    guest: Option<Box<guest::Guest>>,
    hook: pipewire::spa::sys::spa_hook,
    events: pw_sys::pw_impl_module_events,
    core_hook: pipewire::spa::sys::spa_hook,
    core_events: pw_sys::pw_proxy_events,
}

unsafe extern "C" fn on_core_removed(data: *mut c_void) {
    // SAFETY: `data` is the live Module; PipeWire calls us on its main loop.
    let module = unsafe { &mut *data.cast::<Module>() };
    // SAFETY: the hook is linked to the core proxy, which is still alive here.
    unsafe { pipewire::spa::sys::spa_hook_remove(&mut module.core_hook) };
    // SAFETY: all-zero is the "not linked" state module destroy checks for.
    module.core_hook = unsafe { std::mem::zeroed() };
    if let Some(g) = module.guest.as_mut() {
        g.on_core_removed();
    }
}

unsafe extern "C" fn on_module_destroy(data: *mut c_void) {
    // SAFETY: `data` is the Box<Module> leaked in init; destroy is emitted once.
    let mut module = unsafe { Box::from_raw(data.cast::<Module>()) };
    // SAFETY: the hooks were added in init; the core hook is zeroed once removed.
    unsafe {
        pipewire::spa::sys::spa_hook_remove(&mut module.hook);
        if !module.core_hook.link.prev.is_null() {
            pipewire::spa::sys::spa_hook_remove(&mut module.core_hook);
        }
    }
    module.guest.take();
    log::info!("melange: module unloaded");
}

fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .try_init();
}

/// PipeWire's module entry point.
///
/// # Safety
/// Called by PipeWire with a valid module and a NUL-terminated argument string or null.
#[no_mangle]
pub unsafe extern "C" fn pipewire__module_init(module: *mut pw_sys::pw_impl_module, args: *const c_char) -> c_int {
    init_logging();
    let args = if args.is_null() {
        String::new()
    } else {
        // SAFETY: PipeWire passes a NUL-terminated string.
        unsafe { CStr::from_ptr(args) }.to_string_lossy().into_owned()
    };
    let pairs = match parse_args(&args) {
        Ok(p) => p,
        Err(e) => {
            log::error!("melange: {e}");
            return -libc::EINVAL;
        }
    };
    let config = match config::Config::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        Ok((config, unknown)) => {
            for key in unknown {
                log::warn!("melange: ignoring unknown module argument {key}");
            }
            config
        }
        Err(e) => {
            log::error!("melange: {e}");
            return -libc::EINVAL;
        }
    };
    log::info!(
        "melange: guest module {} starting: port {}, codec {}, {} mode, {} us frames, tap quantum {}, sink {}",
        env!("CARGO_PKG_VERSION"),
        config.port,
        config.codec.name(),
        config.mode.name(),
        config.frame_us,
        config.tap_quantum,
        config.sink_name
    );
    // SAFETY: module is valid for the duration of the call.
    let context = unsafe { pw_sys::pw_impl_module_get_context(module) };
    // SAFETY: the context is the loading process's and outlives the module.
    let guest = match unsafe { guest::Guest::start(context, config) } {
        Ok(g) => g,
        Err(e) => {
            log::error!("melange: {e}");
            return -libc::EIO;
        }
    };
    // SAFETY: zeroed spa_hook and events are valid initial values.
    let core = guest.core_ptr();
    // SAFETY: all-zero hooks and event tables are valid "unset" values.
    let mut state = Box::new(unsafe {
        Module {
            guest: Some(guest),
            hook: std::mem::zeroed(),
            events: std::mem::zeroed(),
            core_hook: std::mem::zeroed(),
            core_events: std::mem::zeroed(),
        }
    });
    state.events.version = pw_sys::PW_VERSION_IMPL_MODULE_EVENTS;
    state.events.destroy = Some(on_module_destroy);
    state.core_events.version = pw_sys::PW_VERSION_PROXY_EVENTS;
    state.core_events.removed = Some(on_core_removed);
    let raw = Box::into_raw(state);
    // SAFETY: raw stays valid until on_module_destroy frees it; hooks and events live
    // in it. A pw_core is a pw_proxy (its first member).
    unsafe {
        pw_sys::pw_impl_module_add_listener(module, &mut (*raw).hook, &(*raw).events, raw.cast());
        pw_sys::pw_proxy_add_listener(core.cast(), &mut (*raw).core_hook, &(*raw).core_events, raw.cast());
    }
    0
}

/// Splits module arguments into key/value pairs with PipeWire's own SPA-JSON parser.
fn parse_args(args: &str) -> Result<Vec<(String, String)>, String> {
    let c_args = std::ffi::CString::new(args).map_err(|_| "module arguments contain a NUL byte".to_string())?;
    // SAFETY: c_args is NUL-terminated; the returned properties are freed below.
    let props = unsafe { pw_sys::pw_properties_new_string(c_args.as_ptr()) };
    if props.is_null() {
        return Err(format!("cannot parse module arguments as SPA-JSON: {args}"));
    }
    let mut pairs = Vec::new();
    // SAFETY: props is a valid pw_properties; its dict items are valid C strings.
    unsafe {
        let dict = &(*props).dict;
        for i in 0..dict.n_items as usize {
            let item = &*dict.items.add(i);
            let key = CStr::from_ptr(item.key).to_string_lossy().into_owned();
            let value = CStr::from_ptr(item.value).to_string_lossy().into_owned();
            pairs.push((key, value));
        }
        pw_sys::pw_properties_free(props);
    }
    Ok(pairs)
}
