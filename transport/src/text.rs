//! Text from the peer, made safe to print and to pass on.
//!
//! Every string a peer sends (its software name, close and refuse reasons, an app's
//! name, role, binary, icon and media name) ends up in logs, the journal, PipeWire
//! properties and file names. [`sanitize`] is the one place that makes it harmless; the
//! session applies it to every string it decodes, so no raw peer text ever leaves it.

#![forbid(unsafe_code)]

/// Longest peer string kept, in characters.
pub const MAX_PEER_TEXT: usize = 128;

/// What marks a string cut at [`MAX_PEER_TEXT`].
const CUT: char = '…';

/// `s` without characters that act on a terminal or a log instead of being read, cut to
/// [`MAX_PEER_TEXT`] characters (the last one `…` when cut).
///
/// Dropped: control characters (C0, DEL and C1: escape sequences, `\r`, `\n`, NUL, and
/// the single-character CSI), line and paragraph separators, and the bidirectional
/// controls that reorder what a reader sees (U+200E, U+200F, U+202A..U+202E,
/// U+2066..U+2069). Everything else, any script, stays as it is.
pub fn sanitize(s: &str) -> String {
    let mut kept = s.chars().filter(|c| !hides_or_acts(*c));
    let mut out: String = kept.by_ref().take(MAX_PEER_TEXT).collect();
    if kept.next().is_some() {
        out.pop();
        out.push(CUT);
    }
    out
}

/// Sanitizes `s` where it stands, allocating only when it changes.
pub fn sanitize_in_place(s: &mut String) {
    if s.chars().count() > MAX_PEER_TEXT || s.chars().any(hides_or_acts) {
        *s = sanitize(s);
    }
}

fn hides_or_acts(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_line_breaks_and_nul_are_dropped() {
        assert_eq!(sanitize("\u{1b}[31mred\u{1b}[0m"), "[31mred[0m");
        assert_eq!(sanitize("\u{1b}]0;owned title\u{7}x"), "]0;owned titlex");
        assert_eq!(sanitize("\u{1b}[2J\u{1b}[H"), "[2J[H");
        assert_eq!(sanitize("\u{9b}31m"), "31m", "C1 CSI");
        assert_eq!(sanitize("ok\r\nERROR melange-host: forged"), "okERROR melange-host: forged");
        assert_eq!(sanitize("Fire\0fox\n"), "Firefox");
        assert_eq!(sanitize("a\u{2028}b\u{2029}c"), "abc");
        assert_eq!(sanitize("evil\u{202E}txt.exe"), "eviltxt.exe");
        assert_eq!(sanitize("Équipe (guest) 日本"), "Équipe (guest) 日本");
    }

    #[test]
    fn long_strings_are_cut_and_marked() {
        let cut = sanitize(&"x".repeat(16 * 1024));
        assert_eq!(cut.chars().count(), MAX_PEER_TEXT);
        assert!(cut.ends_with(CUT));
        assert_eq!(sanitize(&"y".repeat(MAX_PEER_TEXT)), "y".repeat(MAX_PEER_TEXT), "at the limit: whole");
        // Dropped characters do not count.
        let s = format!("{}{}", "\n".repeat(500), "z".repeat(MAX_PEER_TEXT));
        assert_eq!(sanitize(&s), "z".repeat(MAX_PEER_TEXT));
    }

    #[test]
    fn in_place_matches_the_function() {
        for s in ["plain", "a\u{1b}b", &"w".repeat(300), ""] {
            let mut t = s.to_string();
            sanitize_in_place(&mut t);
            assert_eq!(t, sanitize(s));
        }
    }
}
