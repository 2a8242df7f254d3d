//! Operating-state clusters of a meter's 15-minute mean power.
//!
//! **Method.** Exact 1-D k-means by dynamic programming (Wang & Song 2011,
//! "Ckmeans.1d.dp: optimal k-means clustering in one dimension by dynamic
//! programming", The R Journal 3/2). On the sorted values `x[0..n]`, `D[q][i]` is
//! the least within-cluster sum of squares of `x[0..=i]` in `q + 1` clusters:
//! `D[q][i] = min_{q <= j <= i} D[q-1][j-1] + ssq(j, i)`, where `ssq` comes from
//! prefix sums of `x` and `x²` (shifted by the median for numerical stability) in
//! O(1). The leftmost minimising `j` never decreases as `i` grows, so each row is
//! filled by divide and conquer in O(n log n): O(k·n·log n) in all. Backtracking the
//! stored `j`s gives the cluster boundaries. The result is the global optimum and
//! fully deterministic (ties pick the leftmost boundary; equal power values are
//! ordered by interval start).
//!
//! **Choosing k (`auto`).** The k in 2..=6 with the highest Bayesian information
//! criterion of the matching 1-D Gaussian mixture, as Ckmeans.1d.dp does: each
//! cluster is a component with weight `n_c / n`, its mean and its sample variance;
//! `BIC = 2·ln L − (3k − 1)·ln n`, with `ln L = Σ_i ln Σ_c w_c·N(x_i; μ_c, σ_c²)`. A
//! cluster whose variance is 0 gets `(d/6)²` and a singleton `d²`, `d` being the
//! distance to its nearest neighbouring value, so a degenerate cluster cannot make
//! the likelihood infinite. One DP for k = 6 serves every k (its rows are the
//! optima for fewer clusters). The criterion assumes bell-shaped states: a state
//! whose values spread flat (say a uniform ±3% band) fits several Gaussians better
//! than one, and `auto` may then split it; a fixed k avoids that.
//!
//! k never exceeds the number of distinct values (all-equal input gives one cluster;
//! empty input none). Non-finite power values are skipped and counted.
//!
//! **Per cluster** (clusters sorted by centre, lowest first): count and share of
//! intervals (share of time: every interval is 15 minutes), centre (mean), min, max,
//! population standard deviation, energy (sum of the intervals' kWh) and share of
//! the total energy (0 when the total is 0), and the three UTC hours of day with the
//! most intervals (ties: earlier hour first).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Lowest and highest k tried by `auto`.
pub const AUTO_K_MIN: usize = 2;
pub const AUTO_K_MAX: usize = 6;
/// Hours of day reported per cluster.
const TOP_HOURS: usize = 3;
const MS_PER_HOUR: i64 = 3_600_000;

/// How many clusters: a fixed number, or `auto` (best BIC in 2..=6).
/// Serialized as a number or the string `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterCount {
    Fixed(usize),
    #[default]
    Auto,
}

impl std::str::FromStr for ClusterCount {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(ClusterCount::Auto);
        }
        match text.parse::<usize>() {
            Ok(k) if k >= 1 => Ok(ClusterCount::Fixed(k)),
            _ => Err(format!(
                "expected `auto` or a number of clusters >= 1, got `{text}`"
            )),
        }
    }
}

impl std::fmt::Display for ClusterCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterCount::Fixed(k) => write!(f, "{k}"),
            ClusterCount::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for ClusterCount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ClusterCount::Fixed(k) => serializer.serialize_u64(*k as u64),
            ClusterCount::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for ClusterCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ClusterCount;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`auto` or a number of clusters >= 1")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ClusterCount, E> {
                match usize::try_from(v) {
                    Ok(k) if k >= 1 => Ok(ClusterCount::Fixed(k)),
                    _ => Err(E::custom(format!("cluster count must be >= 1, got {v}"))),
                }
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ClusterCount, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("cluster count must be >= 1, got {v}"))),
                }
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ClusterCount, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// An hour of day (UTC) and how many of a cluster's intervals start in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HourCount {
    pub hour: u8,
    pub count: usize,
}

/// One operating state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Mean of the cluster's 15-minute mean powers, W.
    pub centre_w: f64,
    pub min_w: f64,
    pub max_w: f64,
    /// Population standard deviation, W.
    pub std_w: f64,
    /// Intervals in the cluster.
    pub count: usize,
    /// `count / n`.
    pub share_time: f64,
    pub energy_kwh: f64,
    /// `energy_kwh / total energy` (0 when the total is 0).
    pub share_energy: f64,
    /// Up to three UTC hours of day with the most intervals, most first.
    pub top_hours: Vec<HourCount>,
}

/// The BIC reached with k clusters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KScore {
    pub k: usize,
    pub bic: f64,
}

/// Clusters of one meter's intervals, as stored and published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    /// What was asked for.
    pub requested: ClusterCount,
    /// Clusters found.
    pub k: usize,
    /// Criterion that chose k: `"bic"` for `auto`, `"fixed"` otherwise.
    pub criterion: String,
    /// BIC per k tried (`auto` only).
    pub scores: Vec<KScore>,
    /// Intervals clustered.
    pub n: usize,
    /// Intervals skipped because their power was not finite.
    pub skipped: usize,
    /// First and last interval start clustered, Unix ms.
    pub first_ms: Option<i64>,
    pub last_ms: Option<i64>,
    /// Energy of all clustered intervals, kWh.
    pub energy_kwh: f64,
    /// Sorted by centre, lowest first.
    pub clusters: Vec<Cluster>,
}

/// Clusters the intervals `(interval_start_ms, mean_power_w, energy_kwh)` of one
/// meter into `count` operating states (see the module doc).
pub fn cluster_intervals(points: &[(i64, f64, f64)], count: ClusterCount) -> ClusterStats {
    let mut sorted: Vec<(i64, f64, f64)> =
        points.iter().copied().filter(|p| p.1.is_finite()).collect();
    let skipped = points.len() - sorted.len();
    sorted.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let values: Vec<f64> = sorted.iter().map(|p| p.1).collect();
    let distinct =
        values.windows(2).filter(|w| w[0] != w[1]).count() + usize::from(!values.is_empty());

    let (k, criterion, scores, sizes) = match count {
        ClusterCount::Fixed(k) => {
            let k = k.min(distinct);
            let dp = Dp::new(&values, k);
            (k, "fixed", Vec::new(), dp.sizes(k))
        }
        ClusterCount::Auto if distinct < AUTO_K_MIN => {
            let k = distinct;
            (k, "bic", Vec::new(), Dp::new(&values, k).sizes(k))
        }
        ClusterCount::Auto => {
            let k_max = AUTO_K_MAX.min(distinct);
            let dp = Dp::new(&values, k_max);
            let scores: Vec<KScore> = (AUTO_K_MIN..=k_max)
                .map(|k| KScore {
                    k,
                    bic: mixture_bic(&values, &dp.sizes(k)),
                })
                .collect();
            // Highest BIC; on a tie the smaller k.
            let best = scores
                .iter()
                .fold(None::<KScore>, |best, s| match best {
                    Some(b) if b.bic >= s.bic => Some(b),
                    _ => Some(*s),
                })
                .map_or(AUTO_K_MIN, |s| s.k);
            (best, "bic", scores, dp.sizes(best))
        }
    };

    let energy_kwh: f64 = sorted.iter().map(|p| p.2).sum();
    let n = sorted.len();
    let mut clusters = Vec::with_capacity(sizes.len());
    let mut left = 0;
    for size in sizes {
        let members = &sorted[left..left + size];
        left += size;
        clusters.push(describe(members, n, energy_kwh));
    }
    ClusterStats {
        requested: count,
        k,
        criterion: criterion.to_string(),
        scores,
        n,
        skipped,
        first_ms: sorted.iter().map(|p| p.0).min(),
        last_ms: sorted.iter().map(|p| p.0).max(),
        energy_kwh,
        clusters,
    }
}

fn describe(members: &[(i64, f64, f64)], n: usize, total_kwh: f64) -> Cluster {
    let count = members.len();
    let mean = members.iter().map(|p| p.1).sum::<f64>() / count as f64;
    let var = members.iter().map(|p| (p.1 - mean).powi(2)).sum::<f64>() / count as f64;
    let energy: f64 = members.iter().map(|p| p.2).sum();
    let mut hours = [0usize; 24];
    for p in members {
        hours[p.0.div_euclid(MS_PER_HOUR).rem_euclid(24) as usize] += 1;
    }
    let mut ranked: Vec<HourCount> = hours
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(h, c)| HourCount {
            hour: h as u8,
            count: *c,
        })
        .collect();
    ranked.sort_by(|a, b| b.count.cmp(&a.count).then(a.hour.cmp(&b.hour)));
    ranked.truncate(TOP_HOURS);
    Cluster {
        centre_w: mean,
        // Members are sorted by power.
        min_w: members[0].1,
        max_w: members[count - 1].1,
        std_w: var.sqrt(),
        count,
        share_time: count as f64 / n as f64,
        energy_kwh: energy,
        share_energy: if total_kwh != 0.0 {
            energy / total_kwh
        } else {
            0.0
        },
        top_hours: ranked,
    }
}

/// Sizes of the optimal `k` clusters of sorted `values`, lowest first. `k` is capped
/// by the number of values; empty input or `k == 0` gives no clusters.
pub fn optimal_partition(sorted_values: &[f64], k: usize) -> Vec<usize> {
    let k = k.min(sorted_values.len());
    Dp::new(sorted_values, k).sizes(k)
}

/// The DP matrices of Ckmeans.1d.dp for up to `k_max` clusters.
struct Dp {
    n: usize,
    /// `prefix[i]`, `prefix_sq[i]`: sums of the first `i` shifted values and squares.
    prefix: Vec<f64>,
    prefix_sq: Vec<f64>,
    /// Row `q`: least cost of `x[0..=i]` in `q + 1` clusters.
    cost: Vec<Vec<f64>>,
    /// Row `q`: first index of the last cluster in that optimum.
    start: Vec<Vec<u32>>,
}

impl Dp {
    fn new(sorted: &[f64], k_max: usize) -> Dp {
        let n = sorted.len();
        let shift = if n > 0 { sorted[n / 2] } else { 0.0 };
        let mut prefix = Vec::with_capacity(n + 1);
        let mut prefix_sq = Vec::with_capacity(n + 1);
        let (mut s, mut s2) = (0.0, 0.0);
        prefix.push(0.0);
        prefix_sq.push(0.0);
        for &x in sorted {
            let d = x - shift;
            s += d;
            s2 += d * d;
            prefix.push(s);
            prefix_sq.push(s2);
        }
        let mut dp = Dp {
            n,
            prefix,
            prefix_sq,
            cost: Vec::with_capacity(k_max),
            start: Vec::with_capacity(k_max),
        };
        if n == 0 || k_max == 0 {
            return dp;
        }
        dp.cost.push((0..n).map(|i| dp.ssq(0, i)).collect());
        dp.start.push(vec![0; n]);
        for q in 1..k_max.min(n) {
            let mut cost = vec![f64::INFINITY; n];
            let mut start = vec![0u32; n];
            dp.fill_row(q, q, n - 1, q, n - 1, &mut cost, &mut start);
            dp.cost.push(cost);
            dp.start.push(start);
        }
        dp
    }

    /// Sum of squared deviations of `x[j..=i]` from their mean.
    fn ssq(&self, j: usize, i: usize) -> f64 {
        let m = (i - j + 1) as f64;
        let s = self.prefix[i + 1] - self.prefix[j];
        let s2 = self.prefix_sq[i + 1] - self.prefix_sq[j];
        (s2 - s * s / m).max(0.0)
    }

    /// Fills `cost[i]`, `start[i]` of row `q` for `i` in `imin..=imax`, knowing the
    /// optimal start lies in `jmin..=jmax` (divide and conquer on the monotone argmin).
    #[allow(clippy::too_many_arguments)]
    fn fill_row(
        &self,
        q: usize,
        imin: usize,
        imax: usize,
        jmin: usize,
        jmax: usize,
        cost: &mut [f64],
        start: &mut [u32],
    ) {
        if imin > imax {
            return;
        }
        let i = imin + (imax - imin) / 2;
        let prev = &self.cost[q - 1];
        let lo = jmin.max(q);
        let hi = jmax.min(i);
        let mut best = f64::INFINITY;
        let mut best_j = lo;
        for j in lo..=hi {
            let c = prev[j - 1] + self.ssq(j, i);
            if c < best {
                best = c;
                best_j = j;
            }
        }
        cost[i] = best;
        start[i] = best_j as u32;
        if i > imin {
            self.fill_row(q, imin, i - 1, jmin, best_j, cost, start);
        }
        self.fill_row(q, i + 1, imax, best_j, jmax, cost, start);
    }

    /// Cluster sizes of the optimum with `k` clusters (`k` <= rows computed).
    fn sizes(&self, k: usize) -> Vec<usize> {
        let k = k.min(self.cost.len());
        if self.n == 0 || k == 0 {
            return Vec::new();
        }
        let mut sizes = vec![0; k];
        let mut right = self.n - 1;
        for q in (0..k).rev() {
            let left = self.start[q][right] as usize;
            sizes[q] = right - left + 1;
            if left == 0 {
                break;
            }
            right = left - 1;
        }
        sizes
    }
}

/// BIC of the Gaussian mixture given by consecutive clusters of `sorted` values
/// (see the module doc).
fn mixture_bic(sorted: &[f64], sizes: &[usize]) -> f64 {
    let n = sorted.len();
    let mut components = Vec::with_capacity(sizes.len());
    let mut left = 0;
    for &size in sizes {
        let right = left + size - 1;
        let members = &sorted[left..=right];
        let mean = members.iter().sum::<f64>() / size as f64;
        let mut var = if size > 1 {
            members.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (size - 1) as f64
        } else {
            0.0
        };
        if var == 0.0 || size == 1 {
            let below = (left > 0).then(|| sorted[left] - sorted[left - 1]);
            let above = (right + 1 < n).then(|| sorted[right + 1] - sorted[right]);
            let d = match (below, above) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => 1.0,
            };
            var = if size == 1 { d * d } else { d * d / 36.0 };
            if var <= 0.0 || !var.is_finite() {
                var = f64::MIN_POSITIVE;
            }
        }
        let weight = size as f64 / n as f64;
        // ln(w / sqrt(2π σ²)) and 1 / (2σ²).
        let log_coeff = weight.ln() - 0.5 * (2.0 * std::f64::consts::PI * var).ln();
        components.push((mean, 0.5 / var, log_coeff));
        left = right + 1;
    }
    let mut log_likelihood = 0.0;
    let mut terms = Vec::with_capacity(components.len());
    for &x in sorted {
        // log-sum-exp, so points far from every component do not underflow to 0.
        terms.clear();
        terms.extend(
            components
                .iter()
                .map(|&(mean, inv2var, log_coeff)| log_coeff - (x - mean).powi(2) * inv2var),
        );
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // Terms below e^-40 of the largest cannot change the f64 sum: skip their exp.
        let sum: f64 = terms
            .iter()
            .filter(|t| **t > max - 40.0)
            .map(|t| (t - max).exp())
            .sum();
        log_likelihood += max + sum.ln();
    }
    let k = sizes.len() as f64;
    2.0 * log_likelihood - (3.0 * k - 1.0) * (n as f64).ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const DAY: i64 = 1_535_068_800_000;
    const Q: i64 = 900_000;

    /// A standard normal draw (Box-Muller).
    fn gauss(rng: &mut rand::rngs::StdRng) -> f64 {
        let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
        let u2: f64 = rng.gen_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Three levels (standby at night, base by day, a 4 kW load in the evening) with
    /// Gaussian noise of 1.5% of the level, two weeks of 15-minute intervals.
    fn three_levels(seed: u64) -> Vec<(i64, f64, f64)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..14 * 96)
            .map(|i| {
                let slot = i % 96;
                let level = match slot {
                    0..=27 => 200.0,
                    72..=83 => 4000.0,
                    _ => 1500.0,
                };
                let p = level * (1.0 + 0.015 * gauss(&mut rng));
                (DAY + i as i64 * Q, p, p * 0.25 / 1000.0)
            })
            .collect()
    }

    #[test]
    fn three_known_levels_are_found_within_two_percent() {
        let points = three_levels(7);
        let stats = cluster_intervals(&points, ClusterCount::Fixed(3));
        assert_eq!(stats.k, 3);
        assert_eq!(stats.n, points.len());
        for (cluster, level) in stats.clusters.iter().zip([200.0, 1500.0, 4000.0]) {
            assert!(
                (cluster.centre_w - level).abs() <= 0.02 * level,
                "centre {} level {level}",
                cluster.centre_w
            );
            assert!(cluster.min_w >= level * 0.9 && cluster.max_w <= level * 1.1);
            assert!(
                (cluster.std_w / (0.015 * level) - 1.0).abs() < 0.15,
                "{}",
                cluster.std_w
            );
        }
        let counts: Vec<usize> = stats.clusters.iter().map(|c| c.count).collect();
        assert_eq!(counts, vec![14 * 28, 14 * 56, 14 * 12]);
        assert!((stats.clusters.iter().map(|c| c.share_time).sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((stats.clusters.iter().map(|c| c.share_energy).sum::<f64>() - 1.0).abs() < 1e-12);
        // Standby lives 00:00-07:00, the 4 kW load 18:00-21:00.
        assert!(stats.clusters[0]
            .top_hours
            .iter()
            .all(|h| h.hour < 7 && h.count == 14 * 4));
        assert!(stats.clusters[2]
            .top_hours
            .iter()
            .all(|h| (18..21).contains(&h.hour)));
        assert_eq!(stats.clusters[2].top_hours.len(), 3);
    }

    #[test]
    fn auto_picks_three_on_three_levels() {
        for seed in 0..10 {
            let stats = cluster_intervals(&three_levels(seed), ClusterCount::Auto);
            assert_eq!(stats.k, 3, "seed {seed}: scores {:?}", stats.scores);
        }
        let stats = cluster_intervals(&three_levels(11), ClusterCount::Auto);
        assert_eq!(stats.criterion, "bic");
        assert_eq!(
            stats.scores.iter().map(|s| s.k).collect::<Vec<_>>(),
            vec![2, 3, 4, 5, 6]
        );
    }

    #[test]
    fn same_input_same_output() {
        let mut points = three_levels(3);
        let a = cluster_intervals(&points, ClusterCount::Auto);
        let b = cluster_intervals(&points, ClusterCount::Auto);
        assert_eq!(a, b);
        // Input order does not matter either.
        points.reverse();
        assert_eq!(cluster_intervals(&points, ClusterCount::Auto), a);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    }

    #[test]
    fn edge_cases() {
        let empty = cluster_intervals(&[], ClusterCount::Auto);
        assert_eq!((empty.k, empty.n, empty.clusters.len()), (0, 0, 0));
        assert_eq!(empty.first_ms, None);

        let two = [(DAY, 100.0, 0.025), (DAY + Q, 900.0, 0.225)];
        let s = cluster_intervals(&two, ClusterCount::Fixed(3));
        assert_eq!(s.k, 2);
        assert_eq!(
            s.clusters.iter().map(|c| c.count).collect::<Vec<_>>(),
            vec![1, 1]
        );
        assert_eq!(s.clusters[1].centre_w, 900.0);
        assert_eq!(s.clusters[1].std_w, 0.0);

        let equal: Vec<(i64, f64, f64)> = (0..50).map(|i| (DAY + i * Q, 300.0, 0.075)).collect();
        for count in [ClusterCount::Auto, ClusterCount::Fixed(4)] {
            let s = cluster_intervals(&equal, count);
            assert_eq!(s.k, 1);
            assert_eq!(s.clusters[0].count, 50);
            assert_eq!(s.clusters[0].std_w, 0.0);
        }

        let with_nan = [
            (DAY, f64::NAN, 0.0),
            (DAY + Q, 10.0, 0.0),
            (DAY + 2 * Q, 20.0, 0.0),
        ];
        let s = cluster_intervals(&with_nan, ClusterCount::Fixed(2));
        assert_eq!((s.n, s.skipped, s.k), (2, 1, 2));
        // Zero energy: shares are 0, not NaN.
        assert!(s.clusters.iter().all(|c| c.share_energy == 0.0));
        assert_eq!(
            cluster_intervals(&with_nan, ClusterCount::Fixed(0))
                .clusters
                .len(),
            0
        );
    }

    /// Least cost over every way to cut `x` into `k` consecutive non-empty runs.
    fn brute_force(x: &[f64], k: usize) -> f64 {
        fn ssq(x: &[f64]) -> f64 {
            let m = x.iter().sum::<f64>() / x.len() as f64;
            x.iter().map(|v| (v - m).powi(2)).sum()
        }
        if k == 1 {
            return ssq(x);
        }
        (1..=x.len() - (k - 1))
            .map(|cut| ssq(&x[..cut]) + brute_force(&x[cut..], k - 1))
            .fold(f64::INFINITY, f64::min)
    }

    fn partition_cost(x: &[f64], sizes: &[usize]) -> f64 {
        let mut left = 0;
        let mut total = 0.0;
        for &s in sizes {
            let part = &x[left..left + s];
            let m = part.iter().sum::<f64>() / s as f64;
            total += part.iter().map(|v| (v - m).powi(2)).sum::<f64>();
            left += s;
        }
        total
    }

    proptest::proptest! {
        #[test]
        fn dp_matches_brute_force(
            mut x in proptest::collection::vec(-100.0f64..5000.0, 1..11),
            k in 1usize..5,
        ) {
            x.sort_by(f64::total_cmp);
            let sizes = optimal_partition(&x, k);
            let k = k.min(x.len());
            proptest::prop_assert_eq!(sizes.len(), k);
            proptest::prop_assert_eq!(sizes.iter().sum::<usize>(), x.len());
            proptest::prop_assert!(sizes.iter().all(|s| *s > 0));
            let best = brute_force(&x, k);
            let got = partition_cost(&x, &sizes);
            proptest::prop_assert!((got - best).abs() <= 1e-6 * best.max(1.0), "got {} best {}", got, best);
        }
    }

    #[test]
    fn cluster_count_parses_and_serializes() {
        assert_eq!("auto".parse::<ClusterCount>().unwrap(), ClusterCount::Auto);
        assert_eq!("4".parse::<ClusterCount>().unwrap(), ClusterCount::Fixed(4));
        assert!("0".parse::<ClusterCount>().is_err());
        assert_eq!(serde_json::to_string(&ClusterCount::Fixed(3)).unwrap(), "3");
        assert_eq!(
            serde_json::to_string(&ClusterCount::Auto).unwrap(),
            "\"auto\""
        );
        assert_eq!(
            serde_json::from_str::<ClusterCount>("5").unwrap(),
            ClusterCount::Fixed(5)
        );
        assert_eq!(
            serde_json::from_str::<ClusterCount>("\"auto\"").unwrap(),
            ClusterCount::Auto
        );
        assert!(serde_json::from_str::<ClusterCount>("-1").is_err());
        #[derive(Deserialize)]
        struct T {
            k: ClusterCount,
        }
        assert_eq!(
            toml::from_str::<T>("k = 3").unwrap().k,
            ClusterCount::Fixed(3)
        );
        assert_eq!(
            toml::from_str::<T>("k = \"auto\"").unwrap().k,
            ClusterCount::Auto
        );
    }
}
