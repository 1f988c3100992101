//! Medians and ratios: every figure the bench reports is a median of runs, and every
//! comparison a ratio of figures measured side by side.

/// The median of `xs` (mean of the two middle values for an even count); None when empty
/// or when a value is not a number.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() || xs.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `a / b`; None when `b` is zero or either is not a number.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        return None;
    }
    Some(a / b)
}

/// The median of the run-by-run ratios `a[i] / b[i]`: each ratio compares two figures of the
/// same run, measured side by side, so drift between runs cancels out.
pub fn median_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    let rs: Vec<f64> = a.iter().zip(b).filter_map(|(x, y)| ratio(*x, *y)).collect();
    if rs.len() != a.len().min(b.len()) {
        return None;
    }
    median(&rs)
}

/// The median of the run-by-run differences `a[i] - b[i]`.
pub fn median_diff(a: &[f64], b: &[f64]) -> Option<f64> {
    let ds: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    median(&ds)
}

/// `f` of the samples `keep` selects, in the order of their runs (`run`): the series that
/// [`median_ratio`] and [`median_diff`] compare run by run.
pub fn series<T>(
    samples: &[T],
    keep: impl Fn(&T) -> bool,
    run: impl Fn(&T) -> usize,
    f: impl Fn(&T) -> f64,
) -> Vec<f64> {
    let mut v: Vec<&T> = samples.iter().filter(|s| keep(s)).collect();
    v.sort_by_key(|s| run(s));
    v.into_iter().map(f).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        // Run by run: (2/1, 6/2, 8/2) = (2, 3, 4).
        assert_eq!(median_ratio(&[2.0, 6.0, 8.0], &[1.0, 2.0, 2.0]), Some(3.0));
        assert_eq!(median_ratio(&[2.0, 6.0], &[1.0, 0.0]), None);
        assert_eq!(median_diff(&[5.0, 9.0, 4.0], &[1.0, 2.0, 3.0]), Some(4.0));
    }

    #[test]
    fn series_in_run_order() {
        let s = [(2, 'a', 20.0), (0, 'a', 0.0), (1, 'b', 1.5), (1, 'a', 10.0)];
        assert_eq!(
            series(&s, |x| x.1 == 'a', |x| x.0, |x| x.2),
            [0.0, 10.0, 20.0]
        );
    }
}
