//! Server-sent events as they arrive: an incremental splitter that finds where each event ends
//! (a blank line; lines end with LF, CRLF or CR, as the SSE specification allows) in a byte
//! stream cut anywhere, looking at each byte once and holding at most the incomplete event.
//! One splitter reads what backends stream (OpenAI chunks, `/v1/responses` typed events) and
//! what is relayed from elsewhere, whatever their line endings.

use bytes::{Bytes, BytesMut};

/// Splits a byte stream into SSE events (see the module comment).
#[derive(Debug)]
pub struct SseSplitter {
    /// The incomplete event, and complete ones not yet taken.
    buf: BytesMut,
    /// How far `buf` has been looked at.
    pos: usize,
    /// No byte but line ends since the last line end (a line end now makes a blank line).
    at_line_start: bool,
    /// The last byte was CR: an LF now completes that line end rather than making another.
    after_cr: bool,
    /// The last event ended with a CR at the end of what had arrived: an LF arriving next is
    /// that event's last byte.
    event_may_continue: bool,
}

/// What the splitter found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A complete event, with the blank line that ends it.
    Event(Bytes),
    /// The LF that completes the CRLF ending the previous event, which arrived after it.
    EndOfPrevious(Bytes),
}

impl Piece {
    /// Its bytes.
    pub fn bytes(&self) -> &Bytes {
        match self {
            Piece::Event(b) | Piece::EndOfPrevious(b) => b,
        }
    }
}

impl Default for SseSplitter {
    fn default() -> Self {
        SseSplitter {
            buf: BytesMut::new(),
            pos: 0,
            at_line_start: true,
            after_cr: false,
            event_may_continue: false,
        }
    }
}

impl SseSplitter {
    /// Adds bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, with the blank line that ends it, if one has arrived.
    pub fn next_piece(&mut self) -> Option<Piece> {
        if self.event_may_continue && !self.buf.is_empty() {
            self.event_may_continue = false;
            if self.buf[0] == b'\n' {
                self.after_cr = false;
                return Some(Piece::EndOfPrevious(self.buf.split_to(1).freeze()));
            }
        }
        while self.pos < self.buf.len() {
            // Only line ends change the state: skip to the next one (most of an event is JSON).
            let Some(skip) = memchr::memchr2(b'\n', b'\r', &self.buf[self.pos..]) else {
                self.pos = self.buf.len();
                self.at_line_start = false;
                self.after_cr = false;
                break;
            };
            if skip > 0 {
                self.at_line_start = false;
                self.after_cr = false;
            }
            self.pos += skip;
            let cr = self.buf[self.pos] == b'\r';
            self.pos += 1;
            let ends = if cr {
                let blank = self.at_line_start;
                self.at_line_start = true;
                self.after_cr = true;
                blank
            } else if self.after_cr {
                // The LF of a CRLF.
                self.after_cr = false;
                false
            } else {
                let blank = self.at_line_start;
                self.at_line_start = true;
                blank
            };
            if ends {
                // An event ended by CR keeps the LF of its CRLF: now if it has arrived, else
                // as a piece of its own when it does.
                if self.after_cr {
                    if self.buf.get(self.pos) == Some(&b'\n') {
                        self.pos += 1;
                        self.after_cr = false;
                    } else {
                        self.event_may_continue = self.pos == self.buf.len();
                    }
                }
                let event = self.buf.split_to(self.pos).freeze();
                self.pos = 0;
                return Some(Piece::Event(event));
            }
        }
        None
    }

    /// Bytes held back: the incomplete event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the incomplete event (at the end of the stream, or to stop reading).
    pub fn take_rest(&mut self) -> Bytes {
        self.pos = 0;
        self.event_may_continue = false;
        self.buf.split().freeze()
    }
}

/// The lines of an event, without their line ends.
pub fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
            let line = rest;
            rest = &[];
            return Some(line);
        };
        let line = &rest[..end];
        let crlf = rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n');
        rest = &rest[end + if crlf { 2 } else { 1 }..];
        Some(line)
    })
}

/// The value of a field line `name: value` (one space after the colon is dropped).
pub fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let value = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(input: &[u8], cuts: &[usize]) -> (Vec<Bytes>, Bytes) {
        let mut s = SseSplitter::default();
        let mut events = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            s.push(&input[at..cut]);
            at = cut;
            while let Some(piece) = s.next_piece() {
                match piece {
                    Piece::Event(e) => events.push(e),
                    Piece::EndOfPrevious(lf) => {
                        let last = events.pop().unwrap();
                        events.push([last, lf].concat().into());
                    }
                }
            }
        }
        (events, s.take_rest())
    }

    #[test]
    fn events_end_at_a_blank_line_whatever_the_line_endings() {
        for (sep, name) in [
            ("\n\n", "LF"),
            ("\r\n\r\n", "CRLF"),
            ("\r\r", "CR"),
            ("\r\n\n", "mixed"),
        ] {
            let input = format!("data: a{sep}data: b{sep}data: [DONE]{sep}");
            let (events, rest) = split_all(input.as_bytes(), &[3, 9, 10, 11, 17]);
            let data: Vec<String> = events
                .iter()
                .map(|e| {
                    let data = lines(e).find_map(|l| field(l, b"data")).unwrap();
                    String::from_utf8(data.to_vec()).unwrap()
                })
                .collect();
            assert_eq!(data, ["a", "b", "[DONE]"], "{name}");
            // Nothing is lost or duplicated: the events and the rest are the input.
            let joined: Vec<u8> = events
                .iter()
                .flatten()
                .chain(rest.iter())
                .copied()
                .collect();
            assert_eq!(joined, input.as_bytes(), "{name}");
        }
    }

    #[test]
    fn an_incomplete_event_is_held_until_its_blank_line() {
        let mut s = SseSplitter::default();
        s.push(b"event: response.completed\r\ndata: {\"x\":1}\r\n");
        assert!(s.next_piece().is_none());
        assert_eq!(s.pending(), 42);
        s.push(b"\r\n");
        let Some(Piece::Event(e)) = s.next_piece() else {
            panic!("an event")
        };
        let l: Vec<&[u8]> = lines(&e).collect();
        assert_eq!(
            l,
            [&b"event: response.completed"[..], b"data: {\"x\":1}", b""]
        );
        assert_eq!(s.pending(), 0);
    }
}
