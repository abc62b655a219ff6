//! Settings shared by the criterion benches: one short measurement profile,
//! so a full `cargo bench` stays within a few minutes on a shared machine.

use std::time::Duration;

use criterion::Criterion;

/// The benches' criterion profile: `measure` per benchmark after a 500 ms
/// warm-up, `samples` samples (criterion's floor is 10).
pub fn profile(measure: Duration, samples: usize) -> Criterion {
    Criterion::default()
        .measurement_time(measure)
        .warm_up_time(Duration::from_millis(500))
        .sample_size(samples)
}
