//! A mutation fuzzer for the baidu_std decoder that runs on stable Rust.
//!
//! Seeds are the real brpc captures (../shared/interop/brpc) plus frames built here. Each round
//! mutates a corpus entry (bit flips, interesting integers written over the length fields and
//! varints, inserts, deletes, splices of two entries), feeds it to the decoder in one piece and
//! in random chunks, and checks the decoder's contract:
//!
//! - it never panics;
//! - `Ok(None)` and fatal errors consume nothing; frames and in-sync errors consume exactly one
//!   frame as declared by the header;
//! - chunked input gives the same frames and errors as the whole input;
//! - every decoded frame re-encodes and decodes to itself; checksum checks never panic.
//!
//! Inputs whose outcome signature (frames, errors, their order) is new are kept in the corpus,
//! a cheap stand-in for coverage feedback. A failing input is written to `fuzz/crashes/` and
//! the process exits 1.
//!
//! Usage: `cargo run --release -p trustwire-fuzz -- --seconds 60 [--seed N] [--replay FILE]`

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use trustwire::wire::{Decoder, Frame, RpcMeta, RpcRequestMeta, RpcResponseMeta, HEADER_LEN};

/// Small limit so "body too large" is reachable with small inputs.
const MAX_BODY: usize = 4096;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash, Clone)]
enum Outcome {
    Frame(usize),
    Error(&'static str, usize),
    NeedMore,
    Fatal(&'static str),
}

/// Decodes `input` fed in the given chunk sizes, checking the contract on every step.
fn run(input: &[u8], chunks: &[usize]) -> Result<Vec<Outcome>, String> {
    let mut dec = Decoder::new(MAX_BODY);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut chunk = chunks.iter().copied().cycle();
    while at < input.len() || buf.is_empty() {
        let n = chunk.next().unwrap_or(input.len()).max(1).min(input.len() - at);
        buf.extend_from_slice(&input[at..at + n]);
        at += n;
        loop {
            let before = buf.clone();
            let declared = (before.len() >= HEADER_LEN)
                .then(|| HEADER_LEN + u32::from_be_bytes(before[4..8].try_into().unwrap()) as usize);
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let used = before.len() - buf.len();
                    if Some(used) != declared {
                        return Err(format!("frame consumed {used} bytes, header says {declared:?}"));
                    }
                    check_frame(&frame)?;
                    out.push(Outcome::Frame(used));
                }
                Ok(None) => {
                    if buf != before {
                        return Err("Ok(None) consumed input".into());
                    }
                    break;
                }
                Err(e) => {
                    let _ = e.to_string();
                    if e.stream_in_sync() {
                        let used = before.len() - buf.len();
                        if Some(used) != declared {
                            return Err(format!("{e:?} consumed {used} bytes, header says {declared:?}"));
                        }
                        out.push(Outcome::Error(e.name(), used));
                    } else {
                        if buf != before {
                            return Err(format!("fatal {e:?} consumed input"));
                        }
                        out.push(Outcome::Fatal(e.name()));
                        return Ok(out);
                    }
                }
            }
        }
        if at == input.len() {
            break;
        }
    }
    if !buf.is_empty() {
        out.push(Outcome::NeedMore);
    }
    Ok(out)
}

fn check_frame(frame: &Frame) -> Result<(), String> {
    let _ = frame.verify_checksum();
    let bytes = frame.to_bytes().map_err(|e| format!("decoded frame does not re-encode: {e}"))?;
    let mut buf = BytesMut::from(&bytes[..]);
    match Decoder::new(usize::MAX).decode(&mut buf) {
        Ok(Some(again)) if again == *frame && buf.is_empty() => Ok(()),
        other => Err(format!("re-encoded frame decodes differently: {other:?}")),
    }
}

/// Runs both the whole-input and a chunked decode and requires the same outcome.
fn check(input: &[u8], rng: &mut Rng) -> Result<Vec<Outcome>, String> {
    let whole = run(input, &[])?;
    let chunks: Vec<usize> = (0..1 + rng.below(4)).map(|_| 1 + rng.below(32)).collect();
    let chunked = run(input, &chunks)?;
    if whole != chunked {
        return Err(format!("chunks {chunks:?} changed the outcome: {whole:?} vs {chunked:?}"));
    }
    Ok(whole)
}

fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/interop/brpc");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "bin")) {
            if let Ok(b) = std::fs::read(&p) {
                seeds.push(b);
            }
        }
    }
    let mut request = Frame {
        meta: RpcMeta {
            request: Some(RpcRequestMeta {
                service_name: Some("example.EchoService".into()),
                method_name: Some("Echo".into()),
                log_id: Some(7),
                timeout_ms: Some(500),
                ..Default::default()
            }),
            correlation_id: Some(1),
            attachment_size: Some(3),
            ..Default::default()
        },
        payload: Bytes::from_static(b"\x0a\x05hello"),
        attachment: Bytes::from_static(b"att"),
    };
    request.set_checksum(true);
    seeds.push(request.to_bytes().unwrap().to_vec());
    let response = Frame {
        meta: RpcMeta {
            response: Some(RpcResponseMeta { error_code: Some(1002), error_text: Some("x".into()) }),
            correlation_id: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    seeds.push(response.to_bytes().unwrap().to_vec());
    seeds.push(b"PRPC\0\0\0\0\0\0\0\0".to_vec());
    seeds
}

const INTERESTING: [u32; 10] = [0, 1, 0x7f, 0x80, 0xff, 0x1000, 0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff];

fn mutate(corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut data = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 if len >= 8 => {
                // Body size or meta size.
                let at = if rng.below(2) == 0 { 4 } else { 8.min(len - 4) };
                let v = INTERESTING[rng.below(INTERESTING.len())].wrapping_add(rng.below(3) as u32);
                data[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below(16.min(len - i));
                data.drain(i..i + n);
            }
            4 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(i..i, fill);
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let cut = rng.below(len + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => {
                // A varint byte with the continuation bit set, inside the meta.
                let i = HEADER_LEN.min(len - 1) + rng.below(len - HEADER_LEN.min(len - 1));
                data[i] |= 0x80;
            }
            7 => data.truncate(rng.below(len + 1)),
            _ => {
                let whole = data.clone();
                data.extend_from_slice(&whole);
            }
        }
        data.truncate(64 * 1024);
    }
    data
}

fn fail(input: &[u8], why: &str) -> ! {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crashes");
    let _ = std::fs::create_dir_all(&dir);
    let name = format!("crash-{:016x}.bin", fnv1a(input));
    let path = dir.join(name);
    let _ = std::fs::write(&path, input);
    eprintln!("FAILED: {why}\ninput ({} bytes) saved to {}", input.len(), path.display());
    std::process::exit(1);
}

fn fnv1a(data: &[u8]) -> u64 {
    // FNV-1a: a stable file name for a failing input.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

fn guarded(input: &[u8], rng: &mut Rng) -> Result<Vec<Outcome>, String> {
    match catch_unwind(AssertUnwindSafe(|| check(input, rng))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("panic: {msg}"))
        }
    }
}

fn main() {
    let mut seconds = 10u64;
    let mut seed = 0x5eed_u64;
    let mut replay = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| usage(&format!("{name} needs a value")));
        match a.as_str() {
            "--seconds" => seconds = value("--seconds").parse().unwrap_or_else(|_| usage("bad --seconds")),
            "--seed" => seed = value("--seed").parse().unwrap_or_else(|_| usage("bad --seed")),
            "--replay" => replay = Some(PathBuf::from(value("--replay"))),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    // Panics are reported by the fuzzer itself, with the input; keep stderr readable.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(seed | 1);
    if let Some(path) = replay {
        let input = std::fs::read(&path).unwrap_or_else(|e| usage(&format!("{}: {e}", path.display())));
        match guarded(&input, &mut rng) {
            Ok(outcome) => println!("ok: {outcome:?}"),
            Err(why) => fail(&input, &why),
        }
        return;
    }

    let mut corpus = seeds();
    let captures = corpus.len();
    // Novelty is judged on the kinds of outcome (repeats folded, first few only), not on byte
    // counts, or every length would count as new.
    let shape = |o: &[Outcome]| -> Vec<&'static str> {
        let mut kinds: Vec<&'static str> = o
            .iter()
            .map(|x| match x {
                Outcome::Frame(_) => "frame",
                Outcome::Error(name, _) | Outcome::Fatal(name) => name,
                Outcome::NeedMore => "need_more",
            })
            .collect();
        kinds.dedup();
        kinds.truncate(4);
        kinds
    };
    let mut seen: HashSet<Vec<&'static str>> = HashSet::new();
    for input in corpus.clone() {
        match guarded(&input, &mut rng) {
            Ok(o) => {
                seen.insert(shape(&o));
            }
            Err(why) => fail(&input, &why),
        }
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut execs = 0u64;
    while Instant::now() < deadline {
        for _ in 0..256 {
            let input = mutate(&corpus, &mut rng);
            match guarded(&input, &mut rng) {
                Ok(outcome) => {
                    if corpus.len() < 4096 && seen.insert(shape(&outcome)) {
                        corpus.push(input);
                    }
                }
                Err(why) => fail(&input, &why),
            }
            execs += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz: {execs} inputs in {secs:.1}s ({:.0}/s), seed {seed}, {captures} seeds, corpus grew to {}, {} distinct outcomes, no failures",
        execs as f64 / secs,
        corpus.len(),
        seen.len()
    );
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("error: {problem}");
    }
    eprintln!("usage: trustwire-fuzz [--seconds N] [--seed N] [--replay FILE]");
    std::process::exit(2);
}
