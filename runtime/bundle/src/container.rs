//! The container: magic, version and three length-prefixed sections.
//!
//! Public so tools can take a bundle apart and put it together without
//! knowing the byte layout; [`RawBundle::parse`] checks only the framing and
//! the limits, never the contents.

use crate::{
    BundleError, FORMAT_VERSION, MAGIC, MAX_BUNDLE_BYTES, MAX_HEADER_BYTES, MAX_SIGNATURES_BYTES,
};

/// A bundle split into its sections, borrowing the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBundle<'a> {
    /// The signed header: canonical JSON.
    pub header: &'a [u8],
    /// The component's bytes.
    pub component: &'a [u8],
    /// The signature list: canonical JSON.
    pub signatures: &'a [u8],
}

impl<'a> RawBundle<'a> {
    /// Splits `bytes` into sections, checking magic, version, every length
    /// against its limit and against what is left, and that nothing follows.
    pub fn parse(bytes: &'a [u8]) -> Result<RawBundle<'a>, BundleError> {
        let total = bytes.len() as u64;
        if total > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge {
                what: "bundle",
                size: total,
                limit: MAX_BUNDLE_BYTES,
            });
        }
        let mut rest = bytes;
        let magic = take(&mut rest, MAGIC.len(), "magic").map_err(|_| BundleError::BadMagic)?;
        if magic != MAGIC {
            return Err(BundleError::BadMagic);
        }
        let version = take(&mut rest, 2, "format version")?;
        let version = u16::from_le_bytes(<[u8; 2]>::try_from(version).unwrap_or([0, 0]));
        if version != FORMAT_VERSION {
            return Err(BundleError::UnsupportedVersion(version));
        }
        let header = section(&mut rest, "header", MAX_HEADER_BYTES)?;
        let component = section(&mut rest, "component", MAX_BUNDLE_BYTES)?;
        let signatures = section(&mut rest, "signatures", MAX_SIGNATURES_BYTES)?;
        if !rest.is_empty() {
            return Err(BundleError::TrailingBytes(rest.len() as u64));
        }
        Ok(RawBundle { header, component, signatures })
    }

    /// The bundle's bytes. Refuses sections over their limits, so whatever
    /// this writes, [`RawBundle::parse`] reads back.
    pub fn to_bytes(&self) -> Result<Vec<u8>, BundleError> {
        let check = |what: &'static str, len: usize, limit: u64| {
            let size = len as u64;
            if size > limit || u32::try_from(len).is_err() {
                return Err(BundleError::TooLarge { what, size, limit });
            }
            Ok(())
        };
        check("header", self.header.len(), MAX_HEADER_BYTES)?;
        check("component", self.component.len(), MAX_BUNDLE_BYTES)?;
        check("signatures", self.signatures.len(), MAX_SIGNATURES_BYTES)?;
        let total =
            MAGIC.len() + 2 + 12 + self.header.len() + self.component.len() + self.signatures.len();
        check("bundle", total, MAX_BUNDLE_BYTES)?;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        for part in [self.header, self.component, self.signatures] {
            // Lengths were checked to fit in u32 above.
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }
}

/// Takes one length-prefixed section off the front of `rest`.
fn section<'a>(
    rest: &mut &'a [u8],
    what: &'static str,
    limit: u64,
) -> Result<&'a [u8], BundleError> {
    let prefix = take(rest, 4, what)?;
    let len = <[u8; 4]>::try_from(prefix).map_err(|_| BundleError::Truncated {
        section: what,
        need: 4,
        have: prefix.len() as u64,
    })?;
    let len = u64::from(u32::from_le_bytes(len));
    if len > limit {
        return Err(BundleError::TooLarge { what, size: len, limit });
    }
    let len = usize::try_from(len).map_err(|_| BundleError::TooLarge { what, size: len, limit })?;
    take(rest, len, what)
}

/// Takes `len` bytes off the front of `rest`, or says how short it is.
fn take<'a>(rest: &mut &'a [u8], len: usize, what: &'static str) -> Result<&'a [u8], BundleError> {
    if rest.len() < len {
        return Err(BundleError::Truncated {
            section: what,
            need: len as u64,
            have: rest.len() as u64,
        });
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Ok(head)
}
