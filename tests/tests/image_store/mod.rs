//! What the image tests share: a node with an image service over a fresh
//! data directory, and tar archives generated entry by entry in each
//! header encoding, hostile ones included.

// Each test binary uses a part of these.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use provd_images::{Images, ImportError, ImportLimits, NoProgress};
use provd_store::Store;

pub struct Node {
    pub _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub images: Images,
}

pub fn node_with(limits: ImportLimits) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Arc::new(Store::open(&data).unwrap());
    // The test machine's disk may be small; the check itself is tested apart.
    Node { images: Images::new(store, limits, 4), data, _dir: dir }
}

pub fn node() -> Node {
    node_with(ImportLimits::default())
}

impl Node {
    pub async fn import(
        &self,
        reference: &str,
    ) -> Result<provd_store::ImageRecord, Arc<ImportError>> {
        self.images.import(reference, Arc::new(NoProgress)).await
    }

    pub fn store(&self) -> &Store {
        self.images.store()
    }

    /// Object files on disk, found by walking the data directory itself.
    pub fn object_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in std::fs::read_dir(self.data.join("objects")).unwrap() {
            for obj in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                out.push(obj.unwrap().path());
            }
        }
        out
    }

    /// Nothing of a failed import is left: no image, no object row or
    /// file, no staging file.
    pub fn assert_empty(&self) {
        let stats = self.store().stats().unwrap();
        assert_eq!((stats.images, stats.objects), (0, 0), "{stats:?}");
        assert!(self.object_files().is_empty(), "{:?}", self.object_files());
        assert!(self.store().staging_files().unwrap().is_empty());
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Enc {
    Ustar,
    Gnu,
    Pax,
}

/// One entry of a generated archive.
#[derive(Debug, Clone)]
pub struct E {
    pub name: Vec<u8>,
    pub kind: tar::EntryType,
    pub link: Vec<u8>,
    pub mode: u32,
    pub device: Option<(u32, u32)>,
    pub data: Vec<u8>,
}

pub fn ef(name: &[u8], data: &[u8]) -> E {
    E {
        name: name.to_vec(),
        kind: tar::EntryType::Regular,
        link: Vec::new(),
        mode: 0o644,
        device: None,
        data: data.to_vec(),
    }
}
pub fn ed(name: &[u8]) -> E {
    E { kind: tar::EntryType::Directory, mode: 0o755, ..ef(name, b"") }
}
pub fn esym(name: &[u8], target: &[u8]) -> E {
    E { kind: tar::EntryType::Symlink, link: target.to_vec(), mode: 0o777, ..ef(name, b"") }
}
pub fn ehard(name: &[u8], target: &[u8]) -> E {
    E { kind: tar::EntryType::Link, link: target.to_vec(), ..ef(name, b"") }
}
pub fn edev(name: &[u8], kind: tar::EntryType, major: u32, minor: u32) -> E {
    E { kind, device: Some((major, minor)), ..ef(name, b"") }
}

/// A raw header record (name and link cut to the old 100-byte fields)
/// and its data, padded to 512 bytes.
pub fn record(out: &mut Vec<u8>, e: &E) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(e.kind);
    h.set_size(e.data.len() as u64);
    h.set_mode(e.mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    if let Some((major, minor)) = e.device {
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
    }
    let old = h.as_old_mut();
    let n = e.name.len().min(old.name.len());
    old.name[..n].copy_from_slice(&e.name[..n]);
    let l = e.link.len().min(old.linkname.len());
    old.linkname[..l].copy_from_slice(&e.link[..l]);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&e.data);
    out.resize(out.len().next_multiple_of(512), 0);
}

/// `<length> <key>=<value>\n`, the length counting itself.
pub fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = len.to_string().len() + body;
    }
    [format!("{len} {key}=").as_bytes(), value, b"\n"].concat()
}

pub fn entry(out: &mut Vec<u8>, enc: Enc, e: &E) {
    let placeholder = |e: &E| E {
        name: b"placeholder".to_vec(),
        link: if e.link.is_empty() { Vec::new() } else { b"placeholder".to_vec() },
        ..e.clone()
    };
    match enc {
        Enc::Ustar => {
            assert!(e.name.len() <= 100 && e.link.len() <= 100, "{e:?} does not fit ustar");
            record(out, e);
        }
        Enc::Gnu => {
            let long = |kind, value: &[u8]| E {
                kind,
                data: [value, b"\0"].concat(),
                ..ef(b"././@LongLink", b"")
            };
            record(out, &long(tar::EntryType::GNULongName, &e.name));
            if !e.link.is_empty() {
                record(out, &long(tar::EntryType::GNULongLink, &e.link));
            }
            record(out, &placeholder(e));
        }
        Enc::Pax => {
            let mut ext = pax_record("path", &e.name);
            if !e.link.is_empty() {
                ext.extend(pax_record("linkpath", &e.link));
            }
            record(out, &E { kind: tar::EntryType::XHeader, data: ext, ..ef(b"pax", b"") });
            record(out, &placeholder(e));
        }
    }
}

pub fn generated(enc: Enc, entries: &[E]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        entry(&mut out, enc, e);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

/// A ustar archive of `entries`, each name in the header's own field.
pub fn archive(entries: &[E]) -> Vec<u8> {
    generated(Enc::Ustar, entries)
}

pub async fn import_bytes(
    node: &Node,
    bytes: &[u8],
) -> Result<provd_store::ImageRecord, Arc<ImportError>> {
    let file = node._dir.path().join(format!("in-{}.tar", blake3::hash(bytes).to_hex()));
    std::fs::write(&file, bytes).unwrap();
    node.import(file.to_str().unwrap()).await
}

/// The good content every hostile archive starts with, so that a failure
/// has objects to clean up.
pub fn good() -> E {
    ef(b"etc/good", b"good content that must not stay behind")
}

/// Writes a header's checksum again after a field was changed by hand.
pub fn fix_checksum(header: &mut [u8]) {
    let sum: u32 = header
        .iter()
        .enumerate()
        .map(|(i, b)| if (148..156).contains(&i) { 32 } else { u32::from(*b) })
        .sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}
