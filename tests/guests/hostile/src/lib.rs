//! A plugin that misbehaves in the way its input names. Every behaviour here
//! is something a malicious or broken plugin could do; the engine's tests run
//! each one and check that provd contains it and keeps serving.
//!
//! Input: a behaviour name, optionally followed by `:` and a number.

#![allow(clippy::panic)]

use provd_sdk::{Error, Plugin, Report, Request, hashing, log, progress};
use std::hint::black_box;

struct Hostile;

impl Plugin for Hostile {
    fn provision(request: Request) -> Result<Report, Error> {
        let (what, n) = match request.input.split_once(':') {
            Some((what, n)) => (what, n.parse::<u64>().unwrap_or(0)),
            None => (request.input.as_str(), 0),
        };
        match what {
            "ok" => Ok(Report::new("fine")),
            "loop" => spin(),
            "grow" => grow(),
            "alloc" => alloc(),
            "recurse" => Ok(Report::new("unreachable").field("depth", recurse(black_box(1)))),
            "recurse-shadow" => {
                Ok(Report::new("unreachable").field("depth", recurse_shadow(black_box(1))))
            }
            "panic" => panic!("deliberate panic from the hostile fixture"),
            "hash" => {
                let data = vec![7u8; n as usize];
                let digest = hashing::blake3(&data)?;
                Ok(Report::new("hashed").field("digest", digest))
            }
            "handles" => {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(hashing::Hasher::new());
                }
                Ok(Report::new("held").field("handles", held.len()))
            }
            "log-flood" => {
                for i in 0..n {
                    log::info("flood", &[("i", &i), ("pad", &"x".repeat(100))]);
                }
                Ok(Report::new("flooded"))
            }
            "print-flood" => {
                for i in 0..n {
                    println!("line {i} {}", "y".repeat(100));
                }
                Ok(Report::new("printed"))
            }
            "bad-progress" => match progress::report("phase", 5, Some(1)) {
                Err(e) => Ok(Report::new("host refused").field("error", e)),
                Ok(()) => Err(Error::Failed("host accepted done > total".into())),
            },
            "refuse" => Err(Error::Denied("this plugin refuses on request".into())),
            other => Err(Error::InvalidInput(format!("unknown behaviour {other:?}"))),
        }
    }
}

/// Never returns and never calls the host: only an epoch deadline stops it.
fn spin() -> Result<Report, Error> {
    let mut x: u64 = 0;
    loop {
        x = black_box(x.wrapping_add(1));
    }
}

/// Grows linear memory a page at a time until refused.
fn grow() -> Result<Report, Error> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut pages = 0u64;
        while core::arch::wasm32::memory_grow(0, 1) != usize::MAX {
            pages += 1;
        }
        Ok(Report::new("memory.grow returned -1").field("pages", pages))
    }
    #[cfg(not(target_arch = "wasm32"))]
    Err(Error::Failed("only meaningful on wasm32".into()))
}

/// Allocates 1 MiB blocks and keeps them.
fn alloc() -> Result<Report, Error> {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        blocks.push(black_box(vec![1u8; 1 << 20]));
    }
}

/// Recurses without bound on the WebAssembly stack (the exit is never
/// reached in practice).
fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    recurse(black_box(depth + 1)) + 1
}

/// Recurses without bound with a buffer in every frame. Rust keeps
/// address-taken locals on a "shadow stack" in linear memory, which runs off
/// the bottom of memory long before the WebAssembly stack is exhausted.
fn recurse_shadow(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    let mut pad = [0u8; 256];
    pad[0] = depth as u8;
    black_box(&mut pad);
    recurse_shadow(black_box(depth + 1)) + u64::from(pad[0])
}

provd_sdk::export_plugin!(Hostile);
