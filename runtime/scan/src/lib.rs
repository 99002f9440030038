//! Finds the file contents that several directory trees share.
//!
//! The scan does the least work that gives an exact answer:
//!
//! 1. walk every tree in parallel (symlinks are not followed), keeping
//!    regular non-empty files; a file reachable by several names (hard
//!    links) counts once per tree;
//! 2. group files by size and drop every group whose files all lie in one
//!    tree: a content only one tree has cannot be shared, whatever it is;
//! 3. hash what is left with BLAKE3, many files in flight at once, with
//!    `POSIX_FADV_NOREUSE` so the pages a scan reads once are not promoted
//!    over the running VMs' data in the page cache;
//! 4. group by (size, digest) and again keep only groups that span two or
//!    more trees.
//!
//! A [`HashCache`] keyed by (device, inode, size, mtime, ctime) lets a
//! re-scan of unchanged trees skip reading: it then costs about a walk.
//!
//! Treatment of special cases, by design: empty files are never reported
//! (an empty file has no content to store once); symlinks, devices, FIFOs
//! and sockets are not content and are skipped; hard links within one tree
//! count once for that tree; duplicates inside a single tree are not
//! reported (the question is what trees share).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("at most {MAX_TREES} trees per scan; got {0}")]
    TooManyTrees(usize),
}

/// Trees one scan may compare.
pub const MAX_TREES: usize = 256;

/// One regular file found by the walk.
#[derive(Debug, Clone)]
struct Found {
    tree: usize,
    path: PathBuf,
    size: u64,
    dev: u64,
    ino: u64,
    /// Modification and status-change times in nanoseconds: with device,
    /// inode and size, the key under which a digest is cached.
    mtime_ns: i128,
    ctime_ns: i128,
}

/// The identity of a file's content as far as the filesystem tells:
/// (device, inode, size, mtime ns, ctime ns). Any write changes mtime or
/// ctime, so a digest cached under it stays true.
type CacheKey = (u64, u64, u64, i128, i128);

/// Digests of earlier scans, kept in a file between runs.
#[derive(Debug, Default)]
pub struct HashCache {
    entries: HashMap<CacheKey, [u8; 32]>,
    /// Keys looked up in this scan: only these are saved, so the cache
    /// does not grow with files that no longer exist.
    used: Mutex<HashMap<CacheKey, [u8; 32]>>,
}

/// Entries one cache file may hold.
const MAX_CACHE_ENTRIES: usize = 10_000_000;

impl HashCache {
    /// Loads a cache file; a missing file is an empty cache, a damaged line
    /// is skipped (the file is only an accelerator).
    pub fn load(path: &Path) -> Result<HashCache, ScanError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashCache::default()),
            Err(source) => return Err(ScanError::Io { path: path.into(), source }),
        };
        let mut entries = HashMap::new();
        for line in text.lines().take(MAX_CACHE_ENTRIES) {
            let f: Vec<&str> = line.split(' ').collect();
            let [dev, ino, size, mtime, ctime, hex] = f.as_slice() else { continue };
            let parsed = (dev.parse(), ino.parse(), size.parse(), mtime.parse(), ctime.parse());
            let (Ok(dev), Ok(ino), Ok(size), Ok(mtime), Ok(ctime)) = parsed else { continue };
            if let Some(digest) = parse_hex(hex) {
                entries.insert((dev, ino, size, mtime, ctime), digest);
            }
        }
        Ok(HashCache { entries, used: Mutex::default() })
    }

    /// Writes the digests this scan used, atomically.
    pub fn save(&self, path: &Path) -> Result<(), ScanError> {
        use std::fmt::Write as _;
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = String::with_capacity(used.len() * 110);
        for ((dev, ino, size, mtime, ctime), digest) in used.iter() {
            let hex = blake3::Hash::from(*digest).to_hex();
            let _ = writeln!(text, "{dev} {ino} {size} {mtime} {ctime} {hex}");
        }
        let tmp = path.with_extension("tmp");
        let io = |source| ScanError::Io { path: path.into(), source };
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn get(&self, key: &CacheKey) -> Option<[u8; 32]> {
        let digest = self.entries.get(key).copied()?;
        self.remember(*key, digest);
        Some(digest)
    }

    fn remember(&self, key: CacheKey, digest: [u8; 32]) {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).insert(key, digest);
    }

    /// Digests this scan took from the cache or added to it.
    pub fn len(&self) -> usize {
        self.used.lock().map(|u| u.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A content that two or more trees hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// BLAKE3 of the content, hex.
    pub blake3: String,
    pub size: u64,
    /// Per tree (index into [`Report::trees`]), the paths holding it.
    pub paths: Vec<(usize, Vec<PathBuf>)>,
}

/// Per-tree figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TreeFigures {
    pub root: PathBuf,
    /// Regular non-empty files (hard links once).
    pub files: u64,
    pub bytes: u64,
    /// Bytes of contents only this tree has.
    pub unique_bytes: u64,
}

/// What the trees share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub trees: Vec<TreeFigures>,
    /// Contents held by two or more trees.
    pub shared_contents: u64,
    /// Those contents' bytes, counted once.
    pub shared_bytes_once: u64,
    /// Those contents' bytes, counted once per tree holding them.
    pub shared_bytes_as_copies: u64,
    /// Files whose digest was needed (the rest were ruled out by size).
    pub files_hashed: u64,
    /// Of those, digests taken from the hash cache instead of read.
    pub files_cached: u64,
    pub bytes_hashed: u64,
    /// The groups, largest first; empty unless asked for.
    pub groups: Vec<Group>,
}

/// How a scan runs.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Threads walking and hashing; reads in flight.
    pub threads: usize,
    /// Keep every group in the report.
    pub groups: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        // Reads in flight matter more than cores: a cold disk wants a deep
        // queue even on a 2-core machine.
        ScanOptions { threads: 8, groups: false }
    }
}

/// Scans `roots` and reports the contents two or more of them share.
pub fn scan(roots: &[PathBuf], options: &ScanOptions) -> Result<Report, ScanError> {
    scan_with_cache(roots, options, &HashCache::default())
}

/// [`scan`], taking digests from `cache` where the file is unchanged and
/// adding the ones it computes.
pub fn scan_with_cache(
    roots: &[PathBuf],
    options: &ScanOptions,
    cache: &HashCache,
) -> Result<Report, ScanError> {
    if roots.len() > MAX_TREES {
        return Err(ScanError::TooManyTrees(roots.len()));
    }
    let threads = options.threads.max(1);
    let found = walk(roots, threads)?;

    // Hard links: one file per (tree, device, inode).
    let mut seen = HashSet::new();
    let mut files: Vec<Found> = Vec::with_capacity(found.len());
    let mut extra_names: HashMap<(usize, u64, u64), Vec<PathBuf>> = HashMap::new();
    for f in found {
        if seen.insert((f.tree, f.dev, f.ino)) {
            files.push(f);
        } else {
            extra_names.entry((f.tree, f.dev, f.ino)).or_default().push(f.path);
        }
    }

    let mut trees: Vec<TreeFigures> = roots
        .iter()
        .map(|r| TreeFigures { root: r.clone(), files: 0, bytes: 0, unique_bytes: 0 })
        .collect();
    for f in &files {
        if let Some(t) = trees.get_mut(f.tree) {
            t.files += 1;
            t.bytes += f.size;
        }
    }

    // Stage 2: sizes present in two or more trees.
    let mut by_size: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        by_size.entry(f.size).or_default().push(i);
    }
    let spans_trees = |members: &[usize]| {
        let first = members.first().and_then(|&i| files.get(i)).map(|f| f.tree);
        members.iter().any(|&i| files.get(i).map(|f| f.tree) != first)
    };
    let candidates: Vec<usize> =
        by_size.values().filter(|m| spans_trees(m)).flatten().copied().collect();

    // Stage 3: hash the candidates in parallel.
    let (digests, files_cached) = hash_all(&files, &candidates, threads, cache)?;
    let bytes_hashed = candidates.iter().filter_map(|&i| files.get(i)).map(|f| f.size).sum();

    // Stage 4: group by content, keep what spans trees.
    let mut by_content: HashMap<(u64, [u8; 32]), Vec<usize>> = HashMap::new();
    for (&i, digest) in candidates.iter().zip(&digests) {
        if let Some(f) = files.get(i) {
            by_content.entry((f.size, *digest)).or_default().push(i);
        }
    }
    let mut shared = HashSet::new();
    let mut report_groups = Vec::new();
    let (mut count, mut once, mut copies) = (0u64, 0u64, 0u64);
    for ((size, digest), members) in &by_content {
        if !spans_trees(members) {
            continue;
        }
        let mut per_tree: HashMap<usize, Vec<PathBuf>> = HashMap::new();
        for &i in members {
            shared.insert(i);
            if let Some(f) = files.get(i) {
                let names = per_tree.entry(f.tree).or_default();
                names.push(f.path.clone());
                if let Some(extra) = extra_names.get(&(f.tree, f.dev, f.ino)) {
                    names.extend(extra.iter().cloned());
                }
            }
        }
        count += 1;
        once += size;
        copies += size * per_tree.len() as u64;
        if options.groups {
            let mut paths: Vec<(usize, Vec<PathBuf>)> = per_tree.into_iter().collect();
            paths.sort();
            for (_, p) in paths.iter_mut() {
                p.sort();
            }
            report_groups.push(Group {
                blake3: blake3::Hash::from(*digest).to_hex().to_string(),
                size: *size,
                paths,
            });
        }
    }
    report_groups.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.blake3.cmp(&b.blake3)));
    for (i, f) in files.iter().enumerate() {
        if !shared.contains(&i)
            && let Some(t) = trees.get_mut(f.tree)
        {
            t.unique_bytes += f.size;
        }
    }
    Ok(Report {
        trees,
        shared_contents: count,
        shared_bytes_once: once,
        shared_bytes_as_copies: copies,
        files_hashed: candidates.len() as u64,
        files_cached,
        bytes_hashed,
        groups: report_groups,
    })
}

/// One regular non-empty file of a tree and its content's BLAKE3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// Relative to the tree's root, `/`-separated.
    pub path: String,
    pub size: u64,
    pub digest: [u8; 32],
}

/// Every regular non-empty file under `root` with its digest, in path
/// order, read by `threads` workers (a placement's view of an image: what
/// it would store, by path and content). Names that are not UTF-8 are
/// skipped, as provd's images refuse them.
pub fn file_digests(root: &Path, threads: usize) -> Result<Vec<FileDigest>, ScanError> {
    let threads = threads.max(1);
    let files = walk(std::slice::from_ref(&root.to_path_buf()), threads)?;
    let all: Vec<usize> = (0..files.len()).collect();
    let (digests, _) = hash_all(&files, &all, threads, &HashCache::default())?;
    let mut out: Vec<FileDigest> = files
        .iter()
        .zip(digests)
        .filter_map(|(f, digest)| {
            let rel = f.path.strip_prefix(root).ok()?.to_str()?.to_string();
            Some(FileDigest { path: rel, size: f.size, digest })
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Walks every root with `threads` workers sharing one queue of directories.
fn walk(roots: &[PathBuf], threads: usize) -> Result<Vec<Found>, ScanError> {
    let queue: Mutex<Vec<(usize, PathBuf)>> =
        Mutex::new(roots.iter().cloned().enumerate().collect());
    let busy = AtomicUsize::new(0);
    let found: Mutex<Vec<Found>> = Mutex::default();
    let error: Mutex<Option<ScanError>> = Mutex::default();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut local = Vec::new();
                loop {
                    let next = {
                        let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                        let item = q.pop();
                        if item.is_some() {
                            busy.fetch_add(1, Ordering::SeqCst);
                        }
                        item
                    };
                    let Some((tree, dir)) = next else {
                        if busy.load(Ordering::SeqCst) == 0 {
                            break;
                        }
                        std::thread::yield_now();
                        continue;
                    };
                    let result = read_dir(tree, &dir, &queue, &mut local);
                    busy.fetch_sub(1, Ordering::SeqCst);
                    if let Err(e) = result {
                        error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    }
                }
                found.lock().unwrap_or_else(|p| p.into_inner()).append(&mut local);
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(found.into_inner().unwrap_or_else(|p| p.into_inner()))
}

fn read_dir(
    tree: usize,
    dir: &Path,
    queue: &Mutex<Vec<(usize, PathBuf)>>,
    out: &mut Vec<Found>,
) -> Result<(), ScanError> {
    use std::os::unix::fs::MetadataExt;
    let io = |path: &Path, source| ScanError::Io { path: path.to_path_buf(), source };
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let ft = entry.file_type().map_err(|e| io(&entry.path(), e))?;
        if ft.is_dir() {
            subdirs.push((tree, entry.path()));
        } else if ft.is_file() {
            let path = entry.path();
            let meta = entry.metadata().map_err(|e| io(&path, e))?;
            if meta.len() > 0 {
                out.push(Found {
                    tree,
                    path,
                    size: meta.len(),
                    dev: meta.dev(),
                    ino: meta.ino(),
                    mtime_ns: i128::from(meta.mtime()) * 1_000_000_000
                        + i128::from(meta.mtime_nsec()),
                    ctime_ns: i128::from(meta.ctime()) * 1_000_000_000
                        + i128::from(meta.ctime_nsec()),
                });
            }
        }
    }
    if !subdirs.is_empty() {
        queue.lock().unwrap_or_else(|p| p.into_inner()).extend(subdirs);
    }
    Ok(())
}

/// BLAKE3 of `files[i]` for every `i` in `which`, in that order, and how
/// many came from the cache.
fn hash_all(
    files: &[Found],
    which: &[usize],
    threads: usize,
    cache: &HashCache,
) -> Result<(Vec<[u8; 32]>, u64), ScanError> {
    let next = AtomicUsize::new(0);
    let cached = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, [u8; 32])>> = Mutex::new(Vec::with_capacity(which.len()));
    let error: Mutex<Option<ScanError>> = Mutex::default();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 256 << 10];
                let mut local = Vec::new();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = which.get(k).and_then(|&i| files.get(i)) else { break };
                    let key = (f.dev, f.ino, f.size, f.mtime_ns, f.ctime_ns);
                    if let Some(d) = cache.get(&key) {
                        cached.fetch_add(1, Ordering::Relaxed);
                        local.push((k, d));
                        continue;
                    }
                    match hash_file(&f.path, &mut buf) {
                        Ok(d) => {
                            cache.remember(key, d);
                            local.push((k, d));
                        }
                        Err(e) => {
                            error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            break;
                        }
                    }
                }
                results.lock().unwrap_or_else(|p| p.into_inner()).append(&mut local);
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(k, _)| *k);
    let cached = cached.into_inner() as u64;
    Ok((results.into_iter().map(|(_, d)| d).collect(), cached))
}

fn hash_file(path: &Path, buf: &mut [u8]) -> Result<[u8; 32], ScanError> {
    use std::io::Read;
    let io = |source| ScanError::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    // Read once and never again: with NOREUSE the kernel does not promote
    // these pages over the running VMs' data. (DONTNEED after reading would
    // also evict pages the VMs had cached.) Advice only: failure changes
    // nothing.
    let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::NoReuse);
    let mut hasher = blake3::Hasher::new();
    loop {
        let n = file.read(buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(*hasher.finalize().as_bytes())
}
