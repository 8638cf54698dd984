//! The receiver's reassembly state machine under arbitrary sequences of admit / received /
//! write (`vfio_multifd::fuzzing::reassembly` says what is checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_multifd::fuzzing::reassembly(data));
