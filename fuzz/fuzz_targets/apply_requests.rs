//! Client requests and Raft log batches, decoded and applied (or served) as the
//! server does.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static HARNESS: OnceLock<kvstore::fuzzing::ApplyHarness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    HARNESS
        .get_or_init(kvstore::fuzzing::ApplyHarness::new)
        .run(data);
});
