//! Control-plane tests.
