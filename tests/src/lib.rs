//! Test-host harness
