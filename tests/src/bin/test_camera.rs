//! A camera for tests: a `Video/Source` node on this user's PipeWire whose every frame
//! says which it is ([`melange_tests::video`]: `--pattern counter`, exact bytes, the
//! default; `--pattern smooth`, a moving picture encoders code well, its number in
//! blocks).
//!
//! Runs until killed; prints one line once the node exists. With `--times FILE` it
//! writes a line `N NS` as it puts frame N, NS on `CLOCK_MONOTONIC` (for latency).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use melange_pw::video::{FrameSlot, PixelFormat, RawVideo, VideoSource};
use melange_tests::video::Pattern;
use pipewire as pw;
use pw::properties::properties;

/// `--format`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    I420,
    Nv12,
    Yuy2,
}

/// A test camera on PipeWire.
#[derive(Debug, Parser)]
#[command(name = "melange-test-camera")]
struct Args {
    /// The node's name (`target-object` for pipewiresrc).
    #[arg(long, default_value = "test-camera")]
    name: String,
    #[arg(long, default_value_t = 640)]
    width: u32,
    #[arg(long, default_value_t = 360)]
    height: u32,
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// The one layout the node offers (frames are made as I420 and converted).
    #[arg(long, value_enum, default_value = "i420")]
    format: Format,
    /// What the frames show.
    #[arg(long, value_enum, default_value = "counter")]
    pattern: Pattern,
    /// Writes `N NS` for each frame put: its number and the time, ns on CLOCK_MONOTONIC.
    #[arg(long)]
    times: Option<std::path::PathBuf>,
}

fn main() {
    let args = Args::parse();
    pw::init();
    let video = RawVideo { width: args.width, height: args.height, fps: args.fps };
    let main_loop: &'static pw::main_loop::MainLoopRc =
        Box::leak(Box::new(pw::main_loop::MainLoopRc::new(None).expect("a main loop")));
    let context = pw::context::ContextRc::new(main_loop, None).expect("a context");
    let core = context.connect_rc(None).expect("a connection to PipeWire");
    let props = properties! {
        "media.type" => "Video",
        "media.category" => "Capture",
        "media.role" => "Camera",
        "media.class" => "Video/Source",
        "node.name" => args.name.as_str(),
        "node.description" => "Melange test camera",
        "session.suspend-timeout-seconds" => "0",
    };
    let stream = pw::stream::StreamRc::new(core, "melange-test-camera", props).expect("a stream");
    let slot = FrameSlot::new().expect("an eventfd");
    let format = match args.format {
        Format::I420 => PixelFormat::I420,
        Format::Nv12 => PixelFormat::Nv12,
        Format::Yuy2 => PixelFormat::Yuy2,
    };
    let source = VideoSource::start_offering(stream, main_loop.loop_(), video, &[format], &[], slot.clone())
        .expect("the source");
    let feeder = slot.clone();
    let pattern = args.pattern;
    let n = std::cell::Cell::new(0u64);
    let times = args.times.as_ref().map(|p| std::fs::File::create(p).expect("the --times file"));
    // A frame at each tick, on the source's own loop.
    let timer = main_loop.loop_().add_timer(move |_| {
        let f = melange_tests::video::frame(pattern, video.width as usize, video.height as usize, n.get());
        if let Some(mut t) = times.as_ref() {
            use std::io::Write;
            let _ = writeln!(t, "{} {}", n.get(), melange_shim::clock::monotonic_ns());
        }
        feeder.put(f);
        n.set(n.get() + 1);
    });
    timer.update_timer(Some(video.interval() / 2), Some(video.interval())).into_result().expect("a timer");
    println!("melange-test-camera: {} ({}x{} I420 at {} fps)", args.name, args.width, args.height, args.fps);
    main_loop.run();
    drop(timer);
    drop(source);
}
