//! Repairs the HTTP/2 `:authority` that etcd 3.4's client sends for per-endpoint
//! calls. `etcdctl endpoint status`, `defrag`, `endpoint hashkv` and `move-leader`
//! dial each endpoint as given, so `--endpoints http://127.0.0.1:2379` (and every
//! `--cluster` variant, which uses the members' client URLs) arrives with
//! `:authority: http://127.0.0.1:2379`. etcd's Go server accepts that; the HTTP/2
//! layer under tonic resets such a stream as malformed.
//!
//! Client connections therefore pass through [`AuthorityFix`], which reads HTTP/2
//! frames as they arrive and rewrites an invalid `:authority` value in HEADERS into
//! a valid one of the same length (HPACK's dynamic table counts value lengths, so
//! both sides keep agreeing on it). Everything else, HTTP/1.1 connections included,
//! passes through untouched; frame payloads other than header blocks are not copied.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's default).
const MAX_FRAME: usize = 16_384;
/// Header blocks larger than this are passed on unread (the HTTP/2 layer refuses
/// them anyway), so a client cannot make this layer buffer much.
const MAX_BLOCK: usize = 256 << 10;
/// The static table index of `:authority` (RFC 7541, appendix A).
const AUTHORITY_INDEX: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not yet known whether the client speaks HTTP/2 with prior knowledge.
    Sniff,
    /// Reading HTTP/2 frames.
    Http2,
    /// Passing bytes through untouched (HTTP/1.1, or an HTTP/2 stream this layer
    /// stopped reading).
    Plain,
}

/// A header block being gathered from a HEADERS frame and its CONTINUATIONs.
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The byte-level rewriting, separate from I/O so it can be tested alone.
struct Rewriter {
    mode: Mode,
    /// Bytes read from the client, not yet looked at.
    input: Vec<u8>,
    /// Bytes ready for the HTTP/2 layer.
    output: Vec<u8>,
    output_pos: usize,
    /// Payload bytes of the current frame that pass through unchanged.
    passthrough: usize,
    block: Option<Block>,
}

impl Rewriter {
    fn new() -> Rewriter {
        Rewriter {
            mode: Mode::Sniff,
            input: Vec::new(),
            output: Vec::new(),
            output_pos: 0,
            passthrough: 0,
            block: None,
        }
    }

    fn pending_output(&self) -> &[u8] {
        &self.output[self.output_pos..]
    }

    fn consume_output(&mut self, n: usize) {
        self.output_pos += n;
        if self.output_pos == self.output.len() {
            self.output.clear();
            self.output_pos = 0;
        }
    }

    /// Whether reads may go straight from the socket to the caller.
    fn direct(&self) -> Option<usize> {
        if !self.input.is_empty() || !self.pending_output().is_empty() {
            return None;
        }
        match self.mode {
            Mode::Plain => Some(usize::MAX),
            Mode::Http2 if self.passthrough > 0 => Some(self.passthrough),
            _ => None,
        }
    }

    /// Bytes read directly by the caller (see `direct`).
    fn passed_directly(&mut self, n: usize) {
        if self.mode == Mode::Http2 {
            self.passthrough -= n;
        }
    }

    /// The client closed its side: whatever was held back goes on as it is.
    fn finish(&mut self) {
        if let Some(block) = self.block.take() {
            self.output.extend(frames(&block, &block.fragment, false));
        }
        self.output.append(&mut self.input);
        self.mode = Mode::Plain;
    }

    /// Moves as much input to the output as can be decided; false when more input
    /// is needed.
    fn process(&mut self) -> bool {
        let mut progressed = false;
        loop {
            let step = match self.mode {
                Mode::Sniff => self.sniff(),
                Mode::Plain => {
                    let moved = !self.input.is_empty();
                    self.output.append(&mut self.input);
                    moved
                }
                Mode::Http2 => self.frame(),
            };
            if !step {
                return progressed;
            }
            progressed = true;
        }
    }

    fn sniff(&mut self) -> bool {
        let seen = self.input.len().min(PREFACE.len());
        if self.input[..seen] != PREFACE[..seen] {
            self.mode = Mode::Plain;
            return true;
        }
        if seen < PREFACE.len() {
            return false;
        }
        self.output.extend(self.input.drain(..PREFACE.len()));
        self.mode = Mode::Http2;
        true
    }

    fn frame(&mut self) -> bool {
        if self.passthrough > 0 {
            let n = self.passthrough.min(self.input.len());
            if n == 0 {
                return false;
            }
            self.output.extend(self.input.drain(..n));
            self.passthrough -= n;
            return true;
        }
        if self.input.len() < FRAME_HEADER {
            return false;
        }
        let length = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]]) as usize;
        let kind = self.input[3];
        let flags = self.input[4];
        let stream =
            u32::from_be_bytes([self.input[5], self.input[6], self.input[7], self.input[8]])
                & 0x7fff_ffff;
        let pending = self.block.is_some();
        let gathered = self.block.as_ref().map_or(0, |b| b.fragment.len());
        let reads = match kind {
            HEADERS => !pending,
            CONTINUATION => pending,
            _ => false,
        } && length + gathered <= MAX_BLOCK;
        if !reads {
            if let Some(block) = self.block.take() {
                // A header block interrupted, or too large to read: it goes on as it
                // came, and this layer stops reading the connection.
                self.output.extend(frames(&block, &block.fragment, false));
                self.mode = Mode::Plain;
                return true;
            }
            self.output.extend(self.input.drain(..FRAME_HEADER));
            self.passthrough = length;
            return true;
        }
        if self.input.len() < FRAME_HEADER + length {
            return false;
        }
        let payload: Vec<u8> = self
            .input
            .drain(..FRAME_HEADER + length)
            .skip(FRAME_HEADER)
            .collect();
        if kind == HEADERS {
            match headers_fragment(flags, &payload) {
                Some((priority, fragment)) => {
                    self.block = Some(Block {
                        stream,
                        flags: flags & !(PADDED | END_HEADERS),
                        priority,
                        fragment: fragment.to_vec(),
                    });
                }
                None => {
                    // Malformed padding: the HTTP/2 layer will say so.
                    self.output
                        .extend(frame_bytes(kind, flags, stream, &payload));
                    self.mode = Mode::Plain;
                    return true;
                }
            }
        } else if let Some(block) = self.block.as_mut() {
            block.fragment.extend_from_slice(&payload);
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("a header block is being gathered");
            let rewritten = rewrite_block(&block.fragment);
            let fragment = rewritten.as_deref().unwrap_or(&block.fragment);
            self.output.extend(frames(&block, fragment, true));
        }
        true
    }
}

/// The header block fragment of a HEADERS payload, without padding, and its
/// priority fields; None when the padding does not fit.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = *body.first()? as usize;
        body = &body[1..];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let fields: [u8; 5] = body.get(..5)?.try_into().ok()?;
        priority = Some(fields);
        body = &body[5..];
    }
    let end = body.len().checked_sub(pad)?;
    Some((priority, &body[..end]))
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&length[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A header block as one HEADERS frame and as many CONTINUATIONs as its size needs;
/// the last one ends the block when it is `complete`.
fn frames(block: &Block, fragment: &[u8], complete: bool) -> Vec<u8> {
    let end = if complete { END_HEADERS } else { 0 };
    let mut first = Vec::new();
    let mut flags = block.flags & !(PADDED | END_HEADERS);
    if let Some(priority) = block.priority {
        first.extend_from_slice(&priority);
    } else {
        flags &= !PRIORITY;
    }
    let take = fragment.len().min(MAX_FRAME - first.len());
    first.extend_from_slice(&fragment[..take]);
    let mut rest = fragment[take..].chunks(MAX_FRAME).peekable();
    let single = rest.peek().is_none();
    let mut out = frame_bytes(
        HEADERS,
        if single { flags | end } else { flags },
        block.stream,
        &first,
    );
    while let Some(chunk) = rest.next() {
        let last = rest.peek().is_none();
        out.extend(frame_bytes(
            CONTINUATION,
            if last { end } else { 0 },
            block.stream,
            chunk,
        ));
    }
    out
}

/// Reads an HPACK integer with an `n`-bit prefix at `pos`; returns it and the
/// position after it.
fn read_int(block: &[u8], pos: usize, n: u32) -> Option<(usize, usize)> {
    let mask = (1usize << n) - 1;
    let mut value = (*block.get(pos)? as usize) & mask;
    let mut pos = pos + 1;
    if value < mask {
        return Some((value, pos));
    }
    let mut shift = 0;
    loop {
        let byte = *block.get(pos)?;
        pos += 1;
        value = value.checked_add(((byte & 0x7f) as usize).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some((value, pos));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

fn write_int(out: &mut Vec<u8>, first_bits: u8, n: u32, value: usize) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(first_bits | value as u8);
        return;
    }
    out.push(first_bits | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A string literal at `pos`: its decoded bytes and the position after it.
fn read_string(block: &[u8], pos: usize) -> Option<(Vec<u8>, usize)> {
    let huffman = *block.get(pos)? & 0x80 != 0;
    let (length, start) = read_int(block, pos, 7)?;
    let end = start.checked_add(length)?;
    let raw = block.get(start..end)?;
    let value = if huffman {
        let mut decoded = Vec::new();
        httlib_huffman::decode(raw, &mut decoded, httlib_huffman::DecoderSpeed::FourBits).ok()?;
        decoded
    } else {
        raw.to_vec()
    };
    Some((value, end))
}

fn write_string(out: &mut Vec<u8>, value: &[u8]) {
    let mut coded = Vec::new();
    if httlib_huffman::encode(value, &mut coded).is_ok() && coded.len() < value.len() {
        write_int(out, 0x80, 7, coded.len());
        out.extend_from_slice(&coded);
    } else {
        write_int(out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
}

/// The header block with every invalid `:authority` value repaired; None when
/// nothing needed repair or the block could not be read (then it goes on as is).
fn rewrite_block(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len() + 16);
    let mut changed = false;
    let mut pos = 0;
    while pos < block.len() {
        let first = block[pos];
        let start = pos;
        let prefix = if first & 0x80 != 0 {
            // Indexed field.
            pos = read_int(block, pos, 7)?.1;
            out.extend_from_slice(&block[start..pos]);
            continue;
        } else if first & 0x40 != 0 {
            6
        } else if first & 0x20 != 0 {
            // Dynamic table size update.
            pos = read_int(block, pos, 5)?.1;
            out.extend_from_slice(&block[start..pos]);
            continue;
        } else {
            4
        };
        let (name_index, after_index) = read_int(block, pos, prefix)?;
        pos = after_index;
        let is_authority = if name_index == 0 {
            let (name, after_name) = read_string(block, pos)?;
            pos = after_name;
            name == b":authority"
        } else {
            name_index == AUTHORITY_INDEX
        };
        let value_start = pos;
        let (value, after_value) = read_string(block, pos)?;
        pos = after_value;
        out.extend_from_slice(&block[start..value_start]);
        match is_authority.then(|| repair_authority(&value)).flatten() {
            Some(repaired) => {
                write_string(&mut out, &repaired);
                changed = true;
            }
            None => out.extend_from_slice(&block[value_start..pos]),
        }
    }
    changed.then_some(out)
}

/// A valid authority of the same length for an invalid one, keeping its host and
/// port: `http://127.0.0.1:2379` becomes `xxxxxxx127.0.0.1:2379`. None when the
/// value is valid already or cannot be repaired.
fn repair_authority(value: &[u8]) -> Option<Vec<u8>> {
    let valid = |bytes: &[u8]| http::uri::Authority::try_from(bytes).is_ok();
    if value.is_empty() || valid(value) {
        return None;
    }
    let after_scheme = value
        .windows(3)
        .position(|w| w == b"://")
        .map_or(value, |at| &value[at + 3..]);
    let end = after_scheme
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(after_scheme.len());
    let core = &after_scheme[..end];
    let mut repaired = vec![b'x'; value.len() - core.len()];
    repaired.extend_from_slice(core);
    if valid(&repaired) {
        return Some(repaired);
    }
    Some(vec![b'x'; value.len()])
}

/// A client connection whose HTTP/2 `:authority` values are repaired (see the
/// module documentation).
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> AuthorityFix<S> {
        AuthorityFix {
            inner,
            rewriter: Rewriter::new(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let pending = this.rewriter.pending_output();
            if !pending.is_empty() {
                let n = pending.len().min(buf.remaining());
                buf.put_slice(&pending[..n]);
                this.rewriter.consume_output(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if let Some(limit) = this.rewriter.direct() {
                let dst = buf.initialize_unfilled_to(limit.min(buf.remaining()));
                let mut direct = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                buf.advance(n);
                this.rewriter.passed_directly(n);
                if n == 0 {
                    this.eof = true;
                }
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.process() {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.rewriter.finish();
                this.eof = true;
                continue;
            }
            this.rewriter.input.extend_from_slice(read.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(out: &mut Vec<u8>, first_bits: u8, prefix: u32, index: usize, value: &[u8]) {
        write_int(out, first_bits, prefix, index);
        write_string(out, value);
    }

    /// Decodes a block's (name index or name, value) pairs with this module's reader.
    fn fields(block: &[u8]) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < block.len() {
            let first = block[pos];
            if first & 0x80 != 0 {
                let (index, next) = read_int(block, pos, 7).unwrap();
                out.push((index, Vec::new()));
                pos = next;
                continue;
            }
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let (index, next) = read_int(block, pos, prefix).unwrap();
            pos = next;
            if index == 0 {
                pos = read_string(block, pos).unwrap().1;
            }
            let (value, next) = read_string(block, pos).unwrap();
            pos = next;
            out.push((index, value));
        }
        out
    }

    fn run(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            rewriter.input.extend_from_slice(piece);
            rewriter.process();
            out.extend_from_slice(rewriter.pending_output());
            let n = rewriter.pending_output().len();
            rewriter.consume_output(n);
        }
        rewriter.finish();
        out.extend_from_slice(rewriter.pending_output());
        out
    }

    #[test]
    fn integers_round_trip() {
        for value in [0, 1, 14, 15, 16, 62, 63, 64, 127, 128, 300, 16_384, 1 << 20] {
            for prefix in [4, 5, 6, 7] {
                let mut out = Vec::new();
                write_int(&mut out, 0, prefix, value);
                assert_eq!(read_int(&out, 0, prefix), Some((value, out.len())));
            }
        }
    }

    #[test]
    fn repairs_keep_the_length() {
        for bad in [
            &b"http://127.0.0.1:2379"[..],
            b"https://10.0.0.7:2379/",
            b"/var/run/kvstore.sock",
            b"unix:///tmp/x",
        ] {
            let good = repair_authority(bad).expect("repaired");
            assert_eq!(good.len(), bad.len());
            assert!(http::uri::Authority::try_from(&good[..]).is_ok());
        }
        assert_eq!(
            repair_authority(b"http://127.0.0.1:2379").unwrap(),
            b"xxxxxxx127.0.0.1:2379"
        );
        assert_eq!(repair_authority(b"127.0.0.1:2379"), None);
    }

    #[test]
    fn rewrites_authority_in_headers_and_continuations() {
        let mut block = Vec::new();
        block.push(0x83); // :method POST
        literal(
            &mut block,
            0x40,
            6,
            AUTHORITY_INDEX,
            b"http://127.0.0.1:2379",
        );
        literal(&mut block, 0x00, 4, 4, b"/etcdserverpb.Maintenance/Status");
        // A literal name.
        block.push(0x10);
        write_string(&mut block, b":authority");
        write_string(&mut block, b"http://localhost:2379");
        block.extend(std::iter::repeat_n(0x82u8, 40_000)); // long: needs CONTINUATIONs

        let mut input = PREFACE.to_vec();
        input.extend(frame_bytes(0x4, 0, 0, &[])); // SETTINGS
        let (head, tail) = block.split_at(10_000);
        // HEADERS with padding and priority, then a CONTINUATION.
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        payload.extend_from_slice(head);
        payload.extend_from_slice(&[0, 0, 0]);
        input.extend(frame_bytes(HEADERS, PADDED | PRIORITY, 1, &payload));
        input.extend(frame_bytes(CONTINUATION, END_HEADERS, 1, tail));
        input.extend(frame_bytes(0x0, 0x1, 1, b"hello")); // DATA, END_STREAM

        for chunk in [1, 7, 4096, usize::MAX] {
            let out = run(&input, chunk);
            assert!(out.starts_with(PREFACE));
            let mut pos = PREFACE.len();
            let mut kinds = Vec::new();
            let mut fragment = Vec::new();
            while pos < out.len() {
                let length = u32::from_be_bytes([0, out[pos], out[pos + 1], out[pos + 2]]) as usize;
                let (kind, flags) = (out[pos + 3], out[pos + 4]);
                assert!(length <= MAX_FRAME);
                let payload = &out[pos + FRAME_HEADER..pos + FRAME_HEADER + length];
                match kind {
                    HEADERS => {
                        assert_eq!(flags & PADDED, 0);
                        assert_ne!(flags & PRIORITY, 0);
                        assert_eq!(&payload[..5], &[0, 0, 0, 0, 15]);
                        fragment.extend_from_slice(&payload[5..]);
                    }
                    CONTINUATION => fragment.extend_from_slice(payload),
                    0x0 => assert_eq!(payload, b"hello"),
                    _ => {}
                }
                kinds.push((kind, flags & END_HEADERS));
                pos += FRAME_HEADER + length;
            }
            assert_eq!(
                kinds,
                [
                    (0x4, 0),
                    (HEADERS, 0),
                    (CONTINUATION, 0),
                    (CONTINUATION, END_HEADERS),
                    (0x0, 0)
                ]
            );
            let decoded = fields(&fragment);
            assert_eq!(
                decoded[1],
                (AUTHORITY_INDEX, b"xxxxxxx127.0.0.1:2379".to_vec())
            );
            assert_eq!(decoded[2].1, b"/etcdserverpb.Maintenance/Status");
            assert_eq!(decoded[3], (0, b"xxxxxxxlocalhost:2379".to_vec()));
            assert_eq!(decoded.len(), 4 + 40_000);
        }
    }

    #[test]
    fn valid_blocks_and_http1_pass_unchanged() {
        let mut block = Vec::new();
        literal(&mut block, 0x40, 6, AUTHORITY_INDEX, b"127.0.0.1:2379");
        let mut input = PREFACE.to_vec();
        input.extend(frame_bytes(HEADERS, END_HEADERS, 1, &block));
        assert_eq!(run(&input, 3), input);

        let http1 = b"GET /health HTTP/1.1\r\nHost: http://x\r\n\r\n".to_vec();
        assert_eq!(run(&http1, 5), http1);
        let short = b"PRI".to_vec();
        assert_eq!(run(&short, 1), short);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 7u64;
        for _ in 0..2_000 {
            let mut input = PREFACE.to_vec();
            let len = (seed % 200) as usize;
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                input.push((seed >> 33) as u8);
            }
            let _ = run(&input, 1 + (seed % 13) as usize);
            let _ = rewrite_block(&input[PREFACE.len()..]);
        }
    }
}
