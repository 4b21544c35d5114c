//! The price of a call in quota units, with new-api's arithmetic (SPEC §4), and the estimate a
//! reservation is taken for. Pure functions.

use crate::core::config::ModelPrice;

/// The most one call may reserve or be charged (2^53 units, 18 billion USD at the default
/// `quota_per_unit`): far below `i64::MAX`, so counters never overflow.
pub const MAX_AMOUNT: i64 = 1 << 53;

/// Tokens a call used (or is estimated to use).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt / input tokens.
    pub prompt_tokens: u64,
    /// Completion / output tokens.
    pub completion_tokens: u64,
}

/// How a model is priced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PriceRule {
    /// Per token: `ratio` units per prompt token, `ratio × completion_ratio` per completion token.
    Ratio {
        /// Model ratio.
        ratio: f64,
        /// Completion ratio (default 1).
        completion_ratio: f64,
    },
    /// A fixed price per call, in USD.
    Fixed {
        /// USD per call.
        price: f64,
    },
}

impl PriceRule {
    /// The rule a sync-file price entry describes (a `price` wins over a `ratio`).
    pub fn from_entry(p: &ModelPrice) -> Option<PriceRule> {
        match (p.price, p.ratio) {
            (Some(price), _) => Some(PriceRule::Fixed { price }),
            (None, Some(ratio)) => Some(PriceRule::Ratio {
                ratio,
                completion_ratio: p.completion_ratio.unwrap_or(1.0),
            }),
            (None, None) => None,
        }
    }
}

/// `ceil(x)` that ignores floating-point noise below 1e-6 (so 0.075 × 80 is 6, not 7).
fn ceil_units(x: f64) -> i64 {
    let rounded = (x * 1e6).round() / 1e6;
    let c = rounded.ceil();
    if c.is_nan() || c >= MAX_AMOUNT as f64 {
        MAX_AMOUNT
    } else if c <= 0.0 {
        0
    } else {
        c as i64
    }
}

/// The price in quota units: `ceil((prompt + completion × c) × r × g)`, at least 1 when
/// `r × g > 0`; a fixed-price model costs `ceil(price × quota_per_unit × g)` per call.
pub fn quota_for(rule: PriceRule, group_ratio: f64, quota_per_unit: f64, usage: Usage) -> i64 {
    match rule {
        PriceRule::Ratio {
            ratio,
            completion_ratio,
        } => {
            let factor = ratio * group_ratio;
            if factor <= 0.0 {
                return 0;
            }
            let tokens =
                usage.prompt_tokens as f64 + usage.completion_tokens as f64 * completion_ratio;
            ceil_units(tokens * factor).max(1)
        }
        PriceRule::Fixed { price } => ceil_units(price * quota_per_unit * group_ratio),
    }
}

/// The token estimate a reservation is taken for, before the call.
///
/// The prompt is estimated as one token per 3 bytes of a JSON body (tokenizers average about 4
/// bytes per token on English text and JSON framing adds more, so this errs high); the
/// completion is the client's `max_completion_tokens` / `max_tokens` / `max_output_tokens`, or
/// `default_completion` when it gave none (0 for embeddings).
pub fn estimate(
    body_len: usize,
    is_json: bool,
    max_tokens: Option<u64>,
    default_completion: u64,
) -> Usage {
    Usage {
        prompt_tokens: if is_json {
            (body_len as u64).div_ceil(3)
        } else {
            0
        },
        completion_tokens: max_tokens.unwrap_or(default_completion),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(r: f64, c: f64) -> PriceRule {
        PriceRule::Ratio {
            ratio: r,
            completion_ratio: c,
        }
    }

    #[test]
    fn new_api_arithmetic() {
        // (100 + 20 × 4) × 0.075 × 1 = 13.5 → 14
        let u = Usage {
            prompt_tokens: 100,
            completion_tokens: 20,
        };
        assert_eq!(quota_for(ratio(0.075, 4.0), 1.0, 500_000.0, u), 14);
        // exact products are not rounded up by float noise: 80 × 0.075 = 6
        let u = Usage {
            prompt_tokens: 80,
            completion_tokens: 0,
        };
        assert_eq!(quota_for(ratio(0.075, 1.0), 1.0, 500_000.0, u), 6);
        // at least 1 when the ratio is positive
        let u = Usage {
            prompt_tokens: 1,
            completion_tokens: 0,
        };
        assert_eq!(quota_for(ratio(0.001, 1.0), 1.0, 500_000.0, u), 1);
        assert_eq!(quota_for(ratio(0.0, 1.0), 1.0, 500_000.0, u), 0);
        // fixed price: 0.04 USD × 500000 × 0.8
        assert_eq!(
            quota_for(PriceRule::Fixed { price: 0.04 }, 0.8, 500_000.0, u),
            16_000
        );
    }

    #[test]
    fn price_entry_prefers_fixed_price() {
        let p = ModelPrice {
            ratio: Some(1.0),
            completion_ratio: None,
            price: Some(0.1),
        };
        assert_eq!(
            PriceRule::from_entry(&p),
            Some(PriceRule::Fixed { price: 0.1 })
        );
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// The price is monotonic in both token counts and never below the exact product.
            #[test]
            fn price_is_monotonic_and_covers_the_exact_product(
                p in 0u64..1_000_000, c in 0u64..1_000_000, dp in 0u64..1000, dc in 0u64..1000,
                r_milli in 1u32..100_000, cr_tenth in 1u32..100, g_tenth in 1u32..30,
            ) {
                let rule = PriceRule::Ratio { ratio: r_milli as f64 / 1000.0, completion_ratio: cr_tenth as f64 / 10.0 };
                let g = g_tenth as f64 / 10.0;
                let a = quota_for(rule, g, 500_000.0, Usage { prompt_tokens: p, completion_tokens: c });
                let b = quota_for(rule, g, 500_000.0, Usage { prompt_tokens: p + dp, completion_tokens: c + dc });
                prop_assert!(a >= 1);
                prop_assert!(b >= a);
                // Exact rational value: (p×10 + c×cr)×r×g / (10×1000×10)
                let exact_num = (p as u128 * 10 + c as u128 * cr_tenth as u128) * r_milli as u128 * g_tenth as u128;
                let exact_den = 10u128 * 1000 * 10;
                let exact_ceil = exact_num.div_ceil(exact_den).max(1) as i64;
                prop_assert_eq!(a, exact_ceil);
            }
        }
    }
}
