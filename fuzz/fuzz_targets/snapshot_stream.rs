//! Snapshot streams as a leader sends them (and snapshot files as restore reads them).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static HARNESS: OnceLock<kvstore::fuzzing::SnapshotHarness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    HARNESS
        .get_or_init(kvstore::fuzzing::SnapshotHarness::new)
        .load(data);
});
