"""The statistics of a study's tables: Student's t for paired differences and for runs against a constant, their
95% intervals, and the exact sign test. Every figure over seeds is mean +- sd (sample standard deviation, n - 1).
A paired difference counts as beyond the seed spread when a two-sided t-test rejects "no difference" at 5%, that is
when its 95% interval excludes 0."""
import math
import statistics

# two-sided 5% critical values of Student's t for 1..30 degrees of freedom (beyond: critical())
T_CRITICAL = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
              2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
              2.045, 2.042)


def critical(n):
    """The two-sided 5% critical value of Student's t for the mean of n values (n - 1 degrees of freedom): the table
    up to 30, then the Cornish-Fisher expansion about the normal's 1.96 (within 1e-4 from 31 on)."""
    df = n - 1
    if df <= len(T_CRITICAL):
        return T_CRITICAL[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired(diffs):
    """(t statistic, beyond the seed spread?) of paired differences; (None, None) for fewer than two."""
    if len(diffs) < 2:
        return None, None
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(len(diffs))) if sd else math.copysign(math.inf, mean) if mean else 0.0
    return t, abs(t) > critical(len(diffs))


def confidence(diffs):
    """Half the width of the 95% confidence interval of the mean of paired differences (Student's t); None for one.
    It excludes 0 exactly when paired() calls the difference beyond the seed spread."""
    if len(diffs) < 2:
        return None
    return critical(len(diffs)) * statistics.stdev(diffs) / math.sqrt(len(diffs))


def interval(diffs):
    """'low to high': the 95% confidence interval of the mean of paired differences; '-' for one."""
    if len(diffs) < 2:
        return "-"
    mean, half = statistics.mean(diffs), confidence(diffs)
    return f"{mean - half:+.2f} to {mean + half:+.2f}"


def sign_test(up, n):
    """Two-sided p of an exact sign test: the chance of a split at least as uneven as `up` of `n` under a fair coin."""
    if not n:
        return 1.0
    extreme = min(up, n - up)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(extreme + 1)) / 2 ** n)


def spread(values, digits=2):
    """'mean +- sd' of the values (sd with n - 1); the value itself for one."""
    text = f"{statistics.mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {statistics.stdev(values):.{digits}f}"
