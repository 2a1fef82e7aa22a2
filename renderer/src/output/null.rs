//! `--output null`: decode and discard (for benchmarks and headless checks).

use super::{Output, OutputError, StreamDesc, StreamSink};

/// Discards everything.
#[derive(Debug)]
pub struct NullOutput;

impl Output for NullOutput {
    fn open(&mut self, _desc: &StreamDesc) -> Result<Box<dyn StreamSink>, OutputError> {
        Ok(Box::new(Discard("null")))
    }

    fn describe(&self) -> String {
        "nowhere (--output null)".into()
    }
}

/// A stream that goes nowhere, and says where that is.
pub(crate) struct Discard(pub &'static str);

impl StreamSink for Discard {
    fn write(&mut self, _samples: &[f32]) {}
    fn buffered_frames(&self) -> usize {
        0
    }
    fn underruns(&self) -> u64 {
        0
    }
    fn overflows(&self) -> u64 {
        0
    }
    fn close(&mut self) -> Result<(), OutputError> {
        Ok(())
    }
    fn describe(&self) -> String {
        self.0.into()
    }
}
