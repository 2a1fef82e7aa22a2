//! A real GStreamer player for tests and the bench: `playbin` on a file, with the seeks
//! and pauses a user makes, at given positions. What it autoplugs is GStreamer's own
//! choice, as in any playbin-based player (Totem, gst-play-1.0).
//!
//! With `--render-rectangle`, it answers its video sink's `prepare-window-handle` as
//! an app with a window does (`GstVideoOverlay`), giving the rectangle to draw in.
//!
//! Prints one JSON line per thing it did (`seek`, `pause`, `resume`, `eos`) with the
//! position and `CLOCK_MONOTONIC`. Exit status: 0 at the end of the file, 1 on an
//! error (printed), 2 when it did not end within `--timeout`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use gstreamer as gst;
use gstreamer::prelude::*;
use serde_json::json;

/// Play a file with playbin.
#[derive(Debug, Parser)]
#[command(name = "melange-player")]
struct Args {
    /// The file to play.
    file: std::path::PathBuf,
    /// Seek when the position reaches AT seconds, to TO seconds (flushing, accurate).
    #[arg(long, value_name = "AT:TO", value_parser = pair)]
    seek: Option<(f64, f64)>,
    /// Pause when the position reaches AT seconds, for FOR seconds.
    #[arg(long, value_name = "AT:FOR", value_parser = pair)]
    pause: Option<(f64, f64)>,
    /// The player's own video sink (a gst-launch description), as apps that set one.
    #[arg(long)]
    video_sink: Option<String>,
    /// Where in its window the app shows the video: X,Y,WIDTH,HEIGHT, given to the
    /// video sink through `GstVideoOverlay` when it asks for a window.
    #[arg(long, value_name = "X,Y,W,H", value_parser = rectangle)]
    render_rectangle: Option<[i32; 4]>,
    /// Seconds before giving up.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
}

fn pair(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s.split_once(':').ok_or("expected A:B")?;
    Ok((a.parse().map_err(|_| "not a number")?, b.parse().map_err(|_| "not a number")?))
}

fn rectangle(s: &str) -> Result<[i32; 4], String> {
    let v: Vec<i32> = s
        .split(',')
        .map(|n| n.trim().parse().map_err(|_| format!("{n:?} is not a number")))
        .collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| "expected X,Y,W,H".into())
}

fn say(event: &str, position: Option<gst::ClockTime>) {
    println!(
        "{}",
        json!({"event": event, "position_s": position.map(|p| p.seconds_f64()),
            "mono_ns": melange_shim::clock::monotonic_ns()})
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = gst::init() {
        eprintln!("melange-player: {e}");
        return ExitCode::FAILURE;
    }
    let file = std::fs::canonicalize(&args.file).unwrap_or(args.file.clone());
    let uri = format!("file://{}", file.display());
    let playbin = gst::ElementFactory::make("playbin").property("uri", &uri).build().expect("playbin");
    if let Some(desc) = &args.video_sink {
        let sink = gst::parse::bin_from_description(desc, true).expect("a video sink description");
        playbin.set_property("video-sink", sink);
    }
    let bus = playbin.bus().expect("a bus");
    if let Some([x, y, w, h]) = args.render_rectangle {
        use gstreamer_video::prelude::*;
        bus.set_sync_handler(move |_, msg| {
            if gstreamer_video::is_video_overlay_prepare_window_handle_message(msg) {
                if let Some(overlay) = msg.src().and_then(|s| s.dynamic_cast_ref::<gstreamer_video::VideoOverlay>()) {
                    let _ = overlay.set_render_rectangle(x, y, w, h);
                    say("render-rectangle", None);
                }
            }
            gst::BusSyncReply::Pass
        });
    }
    playbin.set_state(gst::State::Playing).expect("playing");
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let (mut seek, mut pause) = (args.seek, args.pause);
    let code = loop {
        if Instant::now() > deadline {
            eprintln!("melange-player: no end within {} s", args.timeout);
            break ExitCode::from(2);
        }
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(10)) {
            match msg.view() {
                gst::MessageView::Eos(_) => {
                    say("eos", playbin.query_position::<gst::ClockTime>());
                    break ExitCode::SUCCESS;
                }
                gst::MessageView::Error(e) => {
                    eprintln!("melange-player: {} ({:?})", e.error(), e.debug());
                    break ExitCode::FAILURE;
                }
                _ => {}
            }
        }
        let Some(position) = playbin.query_position::<gst::ClockTime>() else { continue };
        if let Some((at, to)) = seek.filter(|(at, _)| position.seconds_f64() >= *at) {
            say("seek", Some(position));
            let target = gst::ClockTime::from_nseconds((to * 1e9) as u64);
            playbin.seek_simple(gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE, target).expect("seek");
            let _ = at;
            seek = None;
        }
        if let Some((_, hold)) = pause.filter(|(at, _)| position.seconds_f64() >= *at) {
            say("pause", Some(position));
            playbin.set_state(gst::State::Paused).expect("paused");
            std::thread::sleep(Duration::from_secs_f64(hold));
            say("resume", playbin.query_position::<gst::ClockTime>());
            playbin.set_state(gst::State::Playing).expect("playing");
            pause = None;
        }
    };
    let _ = playbin.set_state(gst::State::Null);
    code
}
