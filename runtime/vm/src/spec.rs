//! VM specs.
