//! What kvstore reads back from disk: log entries, stored values and revision keys,
//! auth records, certificate subjects.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvstore::fuzzing::decode_records(data);
});
