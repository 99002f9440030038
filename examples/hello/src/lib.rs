//! The smallest useful provd plugin.
//!
//! Given a name and a list of items, it logs a greeting, hashes every item
//! through the host's native BLAKE3 (capability `hashing`), reports progress
//! item by item, and returns a report with one digest per item.

use provd_sdk::{Error, Plugin, Report, Request, hashing, log, progress};
use serde::{Deserialize, Serialize};

/// The plugin's parameters, from the request's JSON input.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    name: String,
    #[serde(default)]
    items: Vec<String>,
}

#[derive(Serialize)]
struct Digest<'a> {
    item: &'a str,
    blake3: String,
}

struct Hello;

impl Plugin for Hello {
    fn provision(request: Request) -> Result<Report, Error> {
        let input: Input = request.input()?;
        if input.name.is_empty() {
            return Err(Error::InvalidInput("input.name: must not be empty".into()));
        }
        log::info("hello", &[("name", &input.name), ("operation", &request.operation_id)]);

        let total = input.items.len() as u64;
        progress::report("hash-items", 0, Some(total))?;
        let mut digests = Vec::with_capacity(input.items.len());
        for (i, item) in input.items.iter().enumerate() {
            let blake3 = hashing::blake3(item.as_bytes())?;
            log::debug("hashed", &[("item", item), ("blake3", &blake3)]);
            digests.push(Digest { item, blake3 });
            progress::report("hash-items", i as u64 + 1, Some(total))?;
        }
        println!("hello plugin done with {total} items");

        Report::new(format!("hello, {}: hashed {total} items", input.name))
            .field("items", total)
            .output(&digests)
    }
}

provd_sdk::export_plugin!(Hello);
