//! The session's output queue: frames waiting for the port, oldest first.
//!
//! The bytes stay contiguous, so the port writes as much as it takes at once. Beside
//! them the queue keeps where each frame ends and whether it is media, so that when the
//! port falls behind the oldest media can be dropped whole (never a frame the port has
//! begun, never control), and a late peer gets recent audio instead of old.

#![forbid(unsafe_code)]

use std::collections::VecDeque;

/// One queued frame: its length, the stream of a media frame, and the (stream, access
/// unit) of an access unit's frame.
#[derive(Debug, Clone, Copy)]
struct Entry {
    len: usize,
    media: Option<u32>,
    unit: Option<(u32, u64)>,
}

/// Frames queued for the port. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    bytes: Vec<u8>,
    /// Bytes of `bytes` already written.
    pos: usize,
    /// Frames not yet written whole, oldest first; the first may be partly written.
    entries: VecDeque<Entry>,
    /// Bytes of the first entry already written.
    head_written: usize,
    /// Bytes of media frames queued, written or not.
    media_bytes: usize,
}

/// Written frames are dropped from the front once this many bytes of them piled up.
const COMPACT_AT: usize = 64 * 1024;

impl OutQueue {
    /// Bytes waiting for the port.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.bytes[self.pos..]
    }

    /// Bytes of media queued, counting the written part of a frame the port has begun.
    pub(crate) fn media_bytes(&self) -> usize {
        self.media_bytes
    }

    /// Appends one frame that `write` encodes onto the end; `media` names the stream of
    /// a media frame.
    pub(crate) fn push(&mut self, media: Option<u32>, write: impl FnOnce(&mut Vec<u8>)) {
        self.push_entry(media, None, write);
    }

    /// Appends one frame of access unit `unit` of `stream` (see [`OutQueue::drop_units`]).
    pub(crate) fn push_unit(&mut self, stream: u32, unit: u64, write: impl FnOnce(&mut Vec<u8>)) {
        self.push_entry(None, Some((stream, unit)), write);
    }

    fn push_entry(&mut self, media: Option<u32>, unit: Option<(u32, u64)>, write: impl FnOnce(&mut Vec<u8>)) {
        let before = self.bytes.len();
        write(&mut self.bytes);
        let len = self.bytes.len() - before;
        if len > 0 {
            self.entries.push_back(Entry { len, media, unit });
            if media.is_some() {
                self.media_bytes += len;
            }
        }
    }

    /// The rest of the first frame only: what to write before anything else may go.
    pub(crate) fn pending_frame(&self) -> &[u8] {
        let rest = self.entries.front().map_or(0, |e| e.len - self.head_written);
        &self.bytes[self.pos..self.pos + rest]
    }

    /// True when the port has begun the first frame but not finished it.
    pub(crate) fn frame_begun(&self) -> bool {
        self.head_written > 0
    }

    /// Bytes queued and not yet written.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Drops every queued frame of each access unit for which `drop` is true, except
    /// the unit whose frame the port has begun (the peer would lose framing); calls
    /// `dropped` once per unit dropped. Frames of no unit (control) always stay.
    pub(crate) fn drop_units(&mut self, mut drop: impl FnMut(u32, u64) -> bool, mut dropped: impl FnMut(u32, u64)) {
        let begun = self.entries.front().filter(|_| self.head_written > 0).and_then(|e| e.unit);
        let doomed = |e: &Entry, drop: &mut dyn FnMut(u32, u64) -> bool| {
            e.unit.is_some_and(|(s, u)| Some((s, u)) != begun && drop(s, u))
        };
        if !self.entries.iter().any(|e| doomed(e, &mut drop)) {
            return;
        }
        let start = self.pos - self.head_written;
        let mut kept = Vec::with_capacity(self.bytes.len() - start);
        let entries = std::mem::take(&mut self.entries);
        let mut at = start;
        let mut last = None;
        for e in entries {
            let frame = &self.bytes[at..at + e.len];
            at += e.len;
            if doomed(&e, &mut drop) {
                if e.unit != last {
                    if let Some((s, u)) = e.unit {
                        dropped(s, u);
                    }
                    last = e.unit;
                }
                continue;
            }
            kept.extend_from_slice(frame);
            self.entries.push_back(e);
        }
        self.bytes = kept;
        self.pos = self.head_written;
    }

    /// Marks `n` bytes of [`OutQueue::pending`] as written.
    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.bytes.len() - self.pos);
        self.pos += n;
        let mut written = self.head_written + n;
        while let Some(e) = self.entries.front().copied() {
            if written < e.len {
                break;
            }
            written -= e.len;
            if e.media.is_some() {
                self.media_bytes -= e.len;
            }
            self.entries.pop_front();
        }
        self.head_written = written;
        if self.pos == self.bytes.len() {
            self.bytes.clear();
            self.pos = 0;
        } else if self.pos - self.head_written > COMPACT_AT {
            // Up to the start of the first entry: its written part stays, so that a
            // drop can still rebuild it whole.
            let start = self.pos - self.head_written;
            self.bytes.drain(..start);
            self.pos -= start;
        }
    }

    /// Drops whole media frames, oldest first, until at most `max_media` bytes of
    /// media are queued; calls `dropped` with the stream of each. A frame the port has
    /// begun stays (the peer would lose framing), and so does every control frame.
    pub(crate) fn drop_oldest_media(&mut self, max_media: usize, mut dropped: impl FnMut(u32)) {
        if self.media_bytes <= max_media {
            return;
        }
        // Rebuilt from the start of the first entry, its written part included.
        let start = self.pos - self.head_written;
        let mut kept = Vec::with_capacity(self.bytes.len() - start);
        let entries = std::mem::take(&mut self.entries);
        let mut at = start;
        for (i, e) in entries.into_iter().enumerate() {
            let frame = &self.bytes[at..at + e.len];
            at += e.len;
            let begun = i == 0 && self.head_written > 0;
            if let Some(stream) = e.media.filter(|_| !begun && self.media_bytes > max_media) {
                self.media_bytes -= e.len;
                dropped(stream);
                continue;
            }
            kept.extend_from_slice(frame);
            self.entries.push_back(e);
        }
        self.bytes = kept;
        self.pos = self.head_written;
    }

    /// Forgets everything queued.
    pub(crate) fn clear(&mut self) {
        *self = Self { bytes: std::mem::take(&mut self.bytes), ..Self::default() };
        self.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, len: usize) -> impl FnOnce(&mut Vec<u8>) {
        move |v: &mut Vec<u8>| v.extend(std::iter::repeat_n(tag, len))
    }

    #[test]
    fn the_oldest_media_goes_first_and_control_and_a_begun_frame_stay() {
        let mut q = OutQueue::default();
        q.push(Some(1), frame(b'a', 10));
        q.push(None, frame(b'C', 4));
        q.push(Some(2), frame(b'b', 10));
        q.push(Some(1), frame(b'c', 10));
        q.consume(3); // the port has begun the first media frame
        let mut dropped = Vec::new();
        q.drop_oldest_media(20, |s| dropped.push(s));
        // 'a' is begun and stays (10 bytes); 'b' goes, which leaves 20.
        assert_eq!(dropped, [2]);
        assert_eq!(q.media_bytes(), 20);
        assert_eq!(q.pending(), b"aaaaaaaCCCCcccccccccc");
        q.consume(usize::MAX);
        assert!(q.pending().is_empty());
        assert_eq!(q.media_bytes(), 0);
    }

    #[test]
    fn writes_in_any_pieces_keep_the_frame_bookkeeping() {
        let mut q = OutQueue::default();
        for i in 0..50u8 {
            q.push((i % 3 != 0).then_some(7), frame(i, 100 + usize::from(i)));
        }
        let total: usize = (0..50).map(|i| 100 + i).sum();
        let mut seen = Vec::new();
        let mut piece = 1;
        while !q.pending().is_empty() {
            let n = piece.min(q.pending().len());
            seen.extend_from_slice(&q.pending()[..n]);
            q.consume(n);
            piece = piece * 3 % 997 + 1;
        }
        assert_eq!(seen.len(), total);
        assert_eq!(q.media_bytes(), 0);
    }

    #[test]
    fn whole_units_are_dropped_but_never_a_begun_one_nor_control() {
        let mut q = OutQueue::default();
        for (unit, tag) in [(1u64, b'a'), (1, b'b'), (2, b'c'), (2, b'd'), (3, b'e')] {
            q.push_unit(9, unit, frame(tag, 4));
        }
        q.push(None, frame(b'C', 2));
        q.push_unit(5, 1, frame(b'x', 4));
        assert_eq!(q.pending_frame(), b"aaaa");
        q.consume(2);
        assert!(q.frame_begun());
        assert_eq!(q.pending_frame(), b"aa");
        let mut dropped = Vec::new();
        q.drop_units(|s, _| s == 9, |s, u| dropped.push((s, u)));
        // Unit 1 is begun: both its frames stay; 2 and 3 go; control and stream 5 stay.
        assert_eq!(dropped, [(9, 2), (9, 3)]);
        assert_eq!(q.pending(), b"aabbbbCCxxxx");
        assert_eq!(q.len(), 12);
        q.consume(usize::MAX);
        assert!(!q.frame_begun());
        assert!(q.pending_frame().is_empty());
    }

    #[test]
    fn dropping_after_a_compaction_keeps_the_bytes_in_step() {
        let mut q = OutQueue::default();
        for i in 0..200u8 {
            q.push(Some(u32::from(i)), frame(i, 1000));
        }
        q.consume(70_500); // past the compaction point, half-way into frame 70
        let mut dropped = Vec::new();
        q.drop_oldest_media(30_000, |s| dropped.push(s));
        // Frame 70 is begun and stays; 71.. go until 30 000 bytes of media are left.
        assert_eq!(dropped.first(), Some(&71));
        assert_eq!(q.media_bytes(), 30_000);
        let rest = q.pending().to_vec();
        assert_eq!(rest.len(), 500 + 29_000);
        assert!(rest[..500].iter().all(|b| *b == 70));
        assert!(rest[500..1500].iter().all(|b| *b == 171), "the newest stay");
    }
}
