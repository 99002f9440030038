//! A small ISO 9660 writer for NoCloud seeds: one root directory of a few
//! regular files, with Rock Ridge (POSIX names and modes, what Linux and
//! cloud-init read) and Joliet (the names other systems read), written in
//! one pass into memory. It replaces a `xorriso` process per VM.
//!
//! Layout, in 2048-byte sectors: 16 empty (system area), the primary volume
//! descriptor, the Joliet supplementary one, the terminator, the primary
//! and Joliet path tables (L and M each), the primary root directory (with
//! the Rock Ridge entries), the Joliet root directory, then each file's
//! data. Both directories point at the same data.

const SECTOR: usize = 2048;
/// Sector of the primary volume descriptor (after the system area).
const PVD: usize = 16;
const L_TABLE: usize = PVD + 3;
const M_TABLE: usize = L_TABLE + 1;
const JL_TABLE: usize = M_TABLE + 1;
const JM_TABLE: usize = JL_TABLE + 1;
const ROOT: usize = JM_TABLE + 1;
const JROOT: usize = ROOT + 1;
const FIRST_FILE: usize = JROOT + 1;

/// Why an image cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IsoError {
    /// A name outside what this writer spells.
    #[error("file name {0:?}: use 1 to 30 of a-z 0-9 - _")]
    Name(String),
    /// More than one directory sector of entries, or too large a file.
    #[error("{0}")]
    TooLarge(String),
}

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// A directory record: `extent`, `size`, directory or file, the name as
/// stored, then the system use bytes (Rock Ridge entries).
fn record(extent: usize, size: usize, dir: bool, name: &[u8], system_use: &[u8]) -> Vec<u8> {
    let pad = usize::from(name.len().is_multiple_of(2));
    let len = 33 + name.len() + pad + system_use.len();
    let mut r = Vec::with_capacity(len);
    r.push(len as u8);
    r.push(0);
    r.extend(both32(extent as u32));
    r.extend(both32(size as u32));
    // Recording time: 1970-01-01 00:00:00 UTC, the same for every image of
    // the same content.
    r.extend([70, 1, 1, 0, 0, 0, 0]);
    r.push(if dir { 2 } else { 0 });
    r.extend([0, 0]);
    r.extend(both16(1));
    r.push(name.len() as u8);
    r.extend(name);
    r.extend(std::iter::repeat_n(0, pad));
    r.extend(system_use);
    r
}

/// Rock Ridge `PX` (RRIP 1991A): mode, links, owner and group 0.
fn px(mode: u32, links: u32) -> Vec<u8> {
    let mut e = vec![b'P', b'X', 36, 1];
    e.extend(both32(mode));
    e.extend(both32(links));
    e.extend(both32(0));
    e.extend(both32(0));
    e
}

/// Rock Ridge `NM`: the file's real name.
fn nm(name: &str) -> Vec<u8> {
    let mut e = vec![b'N', b'M', (5 + name.len()) as u8, 1, 0];
    e.extend(name.as_bytes());
    e
}

/// The root's `.` entry announces SUSP (`SP`) and Rock Ridge (`ER`).
fn sp_er() -> Vec<u8> {
    let mut e = vec![b'S', b'P', 7, 1, 0xBE, 0xEF, 0];
    let (id, des, src) = (&b"RRIP_1991A"[..], &b"ROCK RIDGE"[..], &b"PROVD"[..]);
    e.extend([b'E', b'R', (8 + id.len() + des.len() + src.len()) as u8, 1]);
    e.extend([id.len() as u8, des.len() as u8, src.len() as u8, 1]);
    e.extend(id);
    e.extend(des);
    e.extend(src);
    e
}

/// Copies `bytes` into `buf` at `offset`. Every offset here is a constant
/// of the format inside a buffer sized for it.
fn put_at(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(offset..offset + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// A padded text field: `text` then `fill` up to `len` bytes.
fn field(text: &[u8], len: usize, fill: &[u8]) -> Vec<u8> {
    let mut f = text.to_vec();
    while f.len() < len {
        f.extend(fill);
    }
    f.truncate(len);
    f
}

/// A volume descriptor: primary (`joliet` false) or the Joliet
/// supplementary one.
fn descriptor(joliet: bool, volume: &str, total: usize, root: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    put_at(&mut d, 0, &[if joliet { 2 } else { 1 }]);
    put_at(&mut d, 1, b"CD001");
    put_at(&mut d, 6, &[1]);
    // Text fields: d-characters in the primary descriptor, UCS-2 in Joliet's,
    // padded with spaces either way.
    let blank: &[u8] = if joliet { &[0, b' '] } else { b" " };
    let text = |s: &str| if joliet { ucs2(s) } else { s.as_bytes().to_vec() };
    put_at(&mut d, 8, &field(&text(""), 32, blank));
    put_at(&mut d, 40, &field(&text(volume), 32, blank));
    put_at(&mut d, 80, &both32(total as u32));
    if joliet {
        // UCS-2 level 3.
        put_at(&mut d, 88, b"%/E");
    }
    put_at(&mut d, 120, &both16(1));
    put_at(&mut d, 124, &both16(1));
    put_at(&mut d, 128, &both16(SECTOR as u16));
    put_at(&mut d, 132, &both32(10));
    let (l, m) = if joliet { (JL_TABLE, JM_TABLE) } else { (L_TABLE, M_TABLE) };
    put_at(&mut d, 140, &(l as u32).to_le_bytes());
    put_at(&mut d, 148, &(m as u32).to_be_bytes());
    put_at(&mut d, 156, root);
    for (start, len) in
        [(190, 128), (318, 128), (446, 128), (574, 128), (702, 37), (739, 37), (776, 37)]
    {
        put_at(&mut d, start, &field(&text(""), len, blank));
    }
    // Creation, modification, expiration and effective times: not given.
    for start in [813, 830, 847, 864] {
        put_at(&mut d, start, b"0000000000000000");
    }
    put_at(&mut d, 881, &[1]);
    d
}

/// A path table of the root alone, little-endian (`L`) or big-endian.
fn path_table(root: usize, little: bool) -> Vec<u8> {
    let mut t = vec![1, 0];
    t.extend(if little { (root as u32).to_le_bytes() } else { (root as u32).to_be_bytes() });
    t.extend(if little { 1u16.to_le_bytes() } else { 1u16.to_be_bytes() });
    t.extend([0, 0]);
    t
}

/// The image of one root directory holding `files` (name, content), labelled
/// `volume`: directory mode 0555, files 0444, owner root.
pub fn image(volume: &str, files: &[(&str, &[u8])]) -> Result<Vec<u8>, IsoError> {
    for (name, _) in files {
        let ok = !name.is_empty()
            && name.len() <= 30
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(IsoError::Name((*name).to_string()));
        }
    }
    let mut sorted: Vec<&(&str, &[u8])> = files.iter().collect();
    sorted.sort_by_key(|(name, _)| iso_name(name));
    let mut at = FIRST_FILE;
    let mut extents = Vec::with_capacity(sorted.len());
    for (_, content) in &sorted {
        if content.len() > u32::MAX as usize / 2 {
            return Err(IsoError::TooLarge(format!("a file of {} bytes", content.len())));
        }
        extents.push(at);
        at += content.len().div_ceil(SECTOR).max(1);
    }
    let total = at;

    let dir_entries = |joliet: bool| -> Result<Vec<u8>, IsoError> {
        let mut dir = Vec::new();
        let own = if joliet { JROOT } else { ROOT };
        let (dot_su, dotdot_su) = if joliet {
            (Vec::new(), Vec::new())
        } else {
            ([sp_er(), px(0o40555, 2)].concat(), px(0o40555, 2))
        };
        dir.extend(record(own, SECTOR, true, &[0], &dot_su));
        dir.extend(record(own, SECTOR, true, &[1], &dotdot_su));
        for ((name, content), extent) in sorted.iter().zip(&extents) {
            let (stored, su) = if joliet {
                (ucs2(name), Vec::new())
            } else {
                (iso_name(name).into_bytes(), [px(0o100444, 1), nm(name)].concat())
            };
            dir.extend(record(*extent, content.len(), false, &stored, &su));
        }
        if dir.len() > SECTOR {
            return Err(IsoError::TooLarge(format!(
                "{} files do not fit one directory sector",
                files.len()
            )));
        }
        Ok(dir)
    };
    let root_dir = dir_entries(false)?;
    let joliet_dir = dir_entries(true)?;

    let mut out = vec![0u8; total * SECTOR];
    let mut put = |sector: usize, bytes: &[u8]| put_at(&mut out, sector * SECTOR, bytes);
    put(PVD, &descriptor(false, volume, total, &record(ROOT, SECTOR, true, &[0], &[])));
    put(PVD + 1, &descriptor(true, volume, total, &record(JROOT, SECTOR, true, &[0], &[])));
    let mut terminator = vec![255u8];
    terminator.extend(b"CD001");
    terminator.push(1);
    put(PVD + 2, &terminator);
    put(L_TABLE, &path_table(ROOT, true));
    put(M_TABLE, &path_table(ROOT, false));
    put(JL_TABLE, &path_table(JROOT, true));
    put(JM_TABLE, &path_table(JROOT, false));
    put(ROOT, &root_dir);
    put(JROOT, &joliet_dir);
    for ((_, content), extent) in sorted.iter().zip(&extents) {
        put(*extent, content);
    }
    Ok(out)
}

/// The primary tree's name of `name`: upper case, `-` as `_`, `.;1`.
fn iso_name(name: &str) -> String {
    format!("{}.;1", name.to_ascii_uppercase().replace('-', "_"))
}
