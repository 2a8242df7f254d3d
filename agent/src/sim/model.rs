//! Deterministic value model of a simulated meter: a pure function of (seed, time).
//!
//! Quantities are computed in base units (V, A, W, Hz, kWh) and converted to the
//! register's unit by the caller. Noise is smooth value noise derived from a hash of
//! (seed, channel, time step), so the same seed and time give the same values.

use std::f64::consts::TAU;

const DAY_S: f64 = 86_400.0;
/// A 15-minute on/off cycle on top of the daily curve (fridge, heat pump).
const CYCLE_S: f64 = 900.0;

/// SplitMix64: a small, good-quality mixer for seeded pseudo-random numbers.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Uniform in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Hash of the seed and two small integers.
fn hash3(seed: u64, a: u64, b: u64) -> u64 {
    splitmix64(splitmix64(seed ^ splitmix64(a)) ^ b)
}

/// Smooth noise in [-1, 1]: random values at integer steps, eased in between.
fn noise(seed: u64, channel: u64, x: f64) -> f64 {
    let floor = x.floor();
    let f = x - floor;
    let step = floor as i64 as u64;
    let a = unit(hash3(seed, channel, step)) * 2.0 - 1.0;
    let b = unit(hash3(seed, channel, step.wrapping_add(1))) * 2.0 - 1.0;
    let s = f * f * (3.0 - 2.0 * f);
    a + (b - a) * s
}

#[derive(Debug, Clone)]
struct Phase {
    /// Mean active power of the phase, W.
    mean_w: f64,
    day_phase: f64,
    cycle_phase: f64,
    volt_offset: f64,
}

/// Parameters drawn once from the seed.
#[derive(Debug, Clone)]
pub(crate) struct Model {
    seed: u64,
    phases: Vec<Phase>,
    /// Model time (s into a day) at which the meter starts.
    pub(crate) start_s: f64,
    import0_kwh: f64,
    export0_kwh: f64,
    /// Export grows at this constant rate (a little solar spill).
    export_w: f64,
}

/// Every quantity at one instant, base units. Index = phase.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct State {
    pub voltage: Vec<f64>,
    pub current: Vec<f64>,
    pub power: Vec<f64>,
    pub power_factor: Vec<f64>,
    pub frequency: f64,
    pub import_kwh: f64,
    pub export_kwh: f64,
    /// Energy imported since the model start, kWh (for registers too small for totals).
    pub import_delta_kwh: f64,
    pub export_delta_kwh: f64,
}

impl Model {
    pub(crate) fn new(seed: u64, phases: usize) -> Model {
        let r = |i: u64| unit(hash3(seed, 0xA11CE, i));
        let phases = (0..phases.clamp(1, 3) as u64)
            .map(|k| Phase {
                mean_w: 200.0 + 1300.0 * r(10 + k),
                day_phase: TAU * r(20 + k),
                cycle_phase: TAU * r(30 + k),
                volt_offset: 4.0 * r(40 + k) - 2.0,
            })
            .collect();
        Model {
            seed,
            phases,
            start_s: DAY_S * r(1),
            import0_kwh: 1_000.0 + 19_000.0 * r(2),
            export0_kwh: 500.0 * r(3),
            export_w: 20.0 * r(4),
        }
    }

    /// Smooth, always positive load of one phase, W.
    fn load(p: &Phase, t: f64) -> f64 {
        p.mean_w
            * (1.0
                + 0.5 * (TAU * t / DAY_S + p.day_phase).sin()
                + 0.2 * (TAU * t / CYCLE_S + p.cycle_phase).sin())
    }

    /// Closed-form integral of `load` from `start_s` to `t`, in joules. The
    /// integrand is at least 0.3 × mean, so this grows with `t`.
    fn load_integral(&self, p: &Phase, t: f64) -> f64 {
        let prim = |t: f64| {
            p.mean_w
                * (t - 0.5 * DAY_S / TAU * (TAU * t / DAY_S + p.day_phase).cos()
                    - 0.2 * CYCLE_S / TAU * (TAU * t / CYCLE_S + p.cycle_phase).cos())
        };
        prim(t) - prim(self.start_s)
    }

    /// The state at model time `t` seconds (`start_s` is the first instant).
    pub(crate) fn state_at(&self, t: f64) -> State {
        let n = self.phases.len();
        let mut s = State {
            voltage: Vec::with_capacity(n),
            current: Vec::with_capacity(n),
            power: Vec::with_capacity(n),
            power_factor: Vec::with_capacity(n),
            frequency: 50.0 + 0.04 * noise(self.seed, 1, t / 5.0),
            import_kwh: 0.0,
            export_kwh: 0.0,
            import_delta_kwh: 0.0,
            export_delta_kwh: 0.0,
        };
        let mut joules = 0.0;
        for (k, p) in self.phases.iter().enumerate() {
            let ch = 100 + 10 * k as u64;
            let load = Self::load(p, t);
            // Heavier load sags the voltage a little, as on a real feeder.
            let v = 231.0 + p.volt_offset - 1.5 * load / p.mean_w
                + 1.2 * noise(self.seed, ch, t / 10.0);
            let pf = (0.92 + 0.06 * noise(self.seed, ch + 1, t / 30.0)).clamp(0.8, 1.0);
            let w = load * (1.0 + 0.03 * noise(self.seed, ch + 2, t / 2.0));
            s.voltage.push(v);
            s.power_factor.push(pf);
            s.power.push(w);
            s.current.push(w / (v * pf));
            joules += self.load_integral(p, t);
        }
        s.import_delta_kwh = joules / 3.6e6;
        s.export_delta_kwh = self.export_w * (t - self.start_s).max(0.0) / 3.6e6;
        s.import_kwh = self.import0_kwh + s.import_delta_kwh;
        s.export_kwh = self.export0_kwh + s.export_delta_kwh;
        s
    }

    /// A smooth value in the middle 70% of `[lo, hi]`, for quantities the model does
    /// not know (gauges) or whose range does not fit the model (a 110 V map).
    pub(crate) fn in_range(&self, channel: u64, lo: f64, hi: f64, t: f64) -> f64 {
        let phase = TAU * unit(hash3(self.seed, 0xB0B, channel));
        let x = 0.5
            + 0.25 * (TAU * t / 3_600.0 + phase).sin()
            + 0.1 * noise(self.seed, 1_000 + channel, t / 7.0);
        lo + (hi - lo) * x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_stay_plausible_over_two_days() {
        for seed in [0, 1, 42, u64::MAX] {
            let m = Model::new(seed, 3);
            let mut last_import = f64::MIN;
            let mut last_export = f64::MIN;
            let mut t = m.start_s;
            while t < m.start_s + 2.0 * DAY_S {
                let s = m.state_at(t);
                for k in 0..3 {
                    assert!((220.0..=240.0).contains(&s.voltage[k]), "{s:?}");
                    assert!((0.8..=1.0).contains(&s.power_factor[k]), "{s:?}");
                    assert!(s.power[k] > 0.0 && s.power[k] < 4_000.0, "{s:?}");
                    let apparent = s.voltage[k] * s.current[k] * s.power_factor[k];
                    assert!((apparent - s.power[k]).abs() < 1e-6 * s.power[k]);
                }
                assert!((49.9..=50.1).contains(&s.frequency));
                assert!(s.import_kwh >= last_import, "import went down at {t}");
                assert!(s.export_kwh >= last_export, "export went down at {t}");
                last_import = s.import_kwh;
                last_export = s.export_kwh;
                t += 7.3;
            }
            // Two days of a 200..1500 W mean per phase: between 28 and 216 kWh.
            let used = last_import - m.state_at(m.start_s).import_kwh;
            assert!((28.0..=217.0).contains(&used), "used {used} kWh");
        }
    }

    #[test]
    fn same_seed_same_values_other_seed_other_values() {
        let a = Model::new(7, 1).state_at(12_345.6);
        let b = Model::new(7, 1).state_at(12_345.6);
        let c = Model::new(8, 1).state_at(12_345.6);
        assert_eq!(a, b);
        assert_ne!(a.voltage, c.voltage);
    }

    #[test]
    fn noise_is_bounded_and_continuous() {
        let mut prev = noise(3, 9, 0.0);
        for i in 1..10_000 {
            let v = noise(3, 9, i as f64 * 0.01);
            assert!((-1.0..=1.0).contains(&v));
            assert!((v - prev).abs() < 0.05, "jump at {i}");
            prev = v;
        }
    }
}
