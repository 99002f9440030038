//! EROFS image reader.
