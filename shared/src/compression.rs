//! zstd decoding with bounded memory and bounded work: a window no larger
//! than [`limits::ZSTD_WINDOW_LOG_MAX`], output in steps of at most
//! [`limits::ZSTD_STEP_BYTES`] so a caller can stop at its own limit after
//! any step, and a stream counted complete only when its last frame ended.

use std::io::{self, Read};

use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer, zstd_sys::ZSTD_ErrorCode};

use crate::limits;

/// Why a zstd stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum ZstdError {
    #[error(
        "a zstd frame needs a window larger than the limit of {} bytes (2^{}); compress with a smaller window (zstd -19 or lower, no --long)",
        1u64 << limits::ZSTD_WINDOW_LOG_MAX,
        limits::ZSTD_WINDOW_LOG_MAX
    )]
    WindowTooLarge,
    #[error("not valid zstd: {0}")]
    Invalid(&'static str),
    #[error("not a complete zstd stream: {0}")]
    Incomplete(&'static str),
    #[error("the zstd decoder could not be set up: {0}")]
    Setup(&'static str),
}

/// The error code zstd returns for `ZSTD_error_frameParameter_windowTooLarge`:
/// zstd returns `(size_t)-code`, and these codes are stable since v1.3.1.
fn window_too_large_code() -> usize {
    0usize.wrapping_sub(ZSTD_ErrorCode::ZSTD_error_frameParameter_windowTooLarge as usize)
}

fn classify(code: usize) -> ZstdError {
    if code == window_too_large_code() {
        ZstdError::WindowTooLarge
    } else {
        ZstdError::Invalid(zstd::zstd_safe::get_error_name(code))
    }
}

/// A decoder fed the compressed stream piece by piece (as it arrives over
/// the network) that hands its output to a sink in bounded steps.
pub struct StreamDecoder {
    dctx: DCtx<'static>,
    out: Vec<u8>,
    /// Whether the input so far ends exactly where a frame ended.
    at_frame_end: bool,
}

impl StreamDecoder {
    pub fn new() -> Result<StreamDecoder, ZstdError> {
        let mut dctx = DCtx::try_create().ok_or(ZstdError::Setup("out of memory"))?;
        dctx.set_parameter(DParameter::WindowLogMax(limits::ZSTD_WINDOW_LOG_MAX))
            .map_err(|c| ZstdError::Setup(zstd::zstd_safe::get_error_name(c)))?;
        Ok(StreamDecoder { dctx, out: vec![0; limits::ZSTD_STEP_BYTES], at_frame_end: false })
    }

    /// Decodes `input`, calling `sink` with each step's output (at most
    /// [`limits::ZSTD_STEP_BYTES`]); an error from `sink` stops decoding at once.
    pub fn feed<E: From<ZstdError>>(
        &mut self,
        input: &[u8],
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut inbuf = InBuffer::around(input);
        loop {
            let before = inbuf.pos();
            let mut outbuf = OutBuffer::around(&mut self.out[..]);
            let hint = self.dctx.decompress_stream(&mut outbuf, &mut inbuf).map_err(classify)?;
            let produced = outbuf.pos();
            let progressed = produced > 0 || inbuf.pos() > before;
            if progressed {
                // 0: a frame was completely decoded and flushed.
                self.at_frame_end = hint == 0;
            }
            if produced > 0 {
                sink(&self.out[..produced])?;
            }
            if !progressed {
                if inbuf.pos() < input.len() {
                    return Err(ZstdError::Invalid("the decoder stopped making progress").into());
                }
                return Ok(());
            }
            // A full output buffer may mean more output is waiting.
            if produced < self.out.len() && inbuf.pos() == input.len() {
                return Ok(());
            }
        }
    }

    /// Accepts the stream only if it holds at least one frame and ends
    /// where a frame ended: a cut frame or trailing bytes are refused.
    pub fn finish(self) -> Result<(), ZstdError> {
        if self.at_frame_end { Ok(()) } else { Err(ZstdError::Incomplete("the last frame is cut short or missing")) }
    }
}

/// A reader of the decompressed bytes of `compressed`, with the window
/// bounded as on the coordinator; a cut frame is an `UnexpectedEof` error.
pub fn zstd_reader<R: Read>(compressed: R) -> io::Result<impl Read> {
    let mut decoder = zstd::stream::read::Decoder::new(compressed)?;
    decoder.window_log_max(limits::ZSTD_WINDOW_LOG_MAX)?;
    Ok(decoder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], piece: usize) -> Result<Vec<u8>, ZstdError> {
        let mut decoder = StreamDecoder::new()?;
        let mut out = Vec::new();
        for chunk in input.chunks(piece.max(1)) {
            decoder.feed(chunk, |b| -> Result<(), ZstdError> {
                out.extend_from_slice(b);
                Ok(())
            })?;
        }
        decoder.finish()?;
        Ok(out)
    }

    fn with_checksum(data: &[u8]) -> Vec<u8> {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.include_checksum(true).unwrap();
        std::io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn decodes_whole_frames_in_any_pieces() {
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let frame = zstd::encode_all(&data[..], 3).unwrap();
        for piece in [1, 7, 4096, frame.len()] {
            assert_eq!(decode_all(&frame, piece).unwrap(), data, "pieces of {piece}");
        }
        let two = [frame.clone(), frame.clone()].concat();
        assert_eq!(decode_all(&two, 999).unwrap(), [data.clone(), data].concat(), "concatenated frames");
    }

    #[test]
    fn refuses_cut_frames_trailing_bytes_and_nothing() {
        let data = vec![42u8; 10_000];
        let frame = with_checksum(&data);
        // Only the checksum missing: every byte decodes, the frame is not whole.
        let e = decode_all(&frame[..frame.len() - 4], 5).unwrap_err();
        assert!(matches!(e, ZstdError::Incomplete(_)), "{e}");
        let e = decode_all(&frame[..frame.len() / 2], 5).unwrap_err();
        assert!(matches!(e, ZstdError::Incomplete(_)), "{e}");
        let plain = zstd::encode_all(&data[..], 3).unwrap();
        let e = decode_all(&[plain.as_slice(), b"garbage!"].concat(), 3).unwrap_err();
        assert!(matches!(e, ZstdError::Invalid(_)), "{e}");
        let e = decode_all(&[plain.as_slice(), &plain[..3]].concat(), 100).unwrap_err();
        assert!(matches!(e, ZstdError::Incomplete(_)), "a second frame's first bytes: {e}");
        assert!(matches!(decode_all(b"", 1).unwrap_err(), ZstdError::Incomplete(_)));
    }

    #[test]
    fn refuses_windows_over_the_limit_in_both_decoders() {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        e.window_log(limits::ZSTD_WINDOW_LOG_MAX + 1).unwrap();
        std::io::Write::write_all(&mut e, &vec![1u8; 1 << 20]).unwrap();
        let big_window = e.finish().unwrap();
        let err = decode_all(&big_window, 1 << 16).unwrap_err();
        assert!(matches!(err, ZstdError::WindowTooLarge), "{err}");
        assert!(err.to_string().contains(&format!("2^{}", limits::ZSTD_WINDOW_LOG_MAX)), "{err}");
        let mut sink = Vec::new();
        assert!(zstd_reader(&big_window[..]).unwrap().read_to_end(&mut sink).is_err());
        let frame = with_checksum(b"hello");
        let mut out = Vec::new();
        zstd_reader(&frame[..]).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello");
        assert!(zstd_reader(&frame[..frame.len() - 2]).unwrap().read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn output_comes_in_bounded_steps_and_the_sink_can_stop_it() {
        let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 3).unwrap();
        let mut decoder = StreamDecoder::new().unwrap();
        let mut total = 0usize;
        let limit = 1 << 20;
        let r = decoder.feed(&bomb, |b| {
            assert!(b.len() <= limits::ZSTD_STEP_BYTES);
            total += b.len();
            if total > limit { Err(ZstdError::Invalid("over")) } else { Ok(()) }
        });
        assert!(r.is_err());
        assert!(total <= limit + limits::ZSTD_STEP_BYTES, "stopped within one step of the limit: {total}");
    }
}
