//! The upstreams a request can go to: which pool serves a model, its targets and how one is
//! chosen, when a failed attempt is retried, and the targets' health.

mod health;
mod retry;
mod select;
mod target;

pub use self::health::spawn_health_checks;
pub use self::retry::{parse_retry_after, RetryPolicy, MAX_COOLDOWN};
pub use self::select::{select, Pick};
pub use self::target::{Target, TargetState};
use crate::core::config::{HealthConfig, PoolConfig, UpstreamConfig};
use crate::core::table::ModelPattern;
pub use crate::core::url::UpstreamUrl;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Milliseconds on a monotonic clock (never 0): the unit of the targets' states.
#[inline]
pub fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One pool: a name, the models it serves, its targets and its retry policy.
pub struct Upstream {
    /// Its name (logs, metrics).
    pub name: String,
    /// The first target's URL.
    pub url: UpstreamUrl,
    models: Vec<ModelPattern>,
    /// The targets, in config order (at most 64).
    pub targets: Vec<Target>,
    levels: Vec<Box<[usize]>>,
    counter: AtomicU64,
    /// The first priority with a weight: its targets and their running weight sums, for
    /// choosing while every target is clear.
    calm: Calm,
    /// Bumped by the targets' states at every trouble (shared with them).
    troubles: Arc<AtomicU64>,
    /// The value of `troubles` when every target was last seen clear.
    calm_at: AtomicU64,
    /// When (a [`now_ms`] time) the full choice last looked whether every target is clear:
    /// at most once a millisecond.
    calm_checked: AtomicU64,
    /// When a failed attempt is tried again.
    pub retry: RetryPolicy,
    /// Consecutive failures that eject a target.
    pub eject_after: u32,
    /// The active health check, when configured.
    pub health: Option<HealthConfig>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("targets", &self.targets)
            .finish()
    }
}

impl Upstream {
    /// A pool of one from the plugin API's single-URL config.
    pub fn from_config(c: &UpstreamConfig) -> std::result::Result<Upstream, String> {
        Upstream::from_pool(&PoolConfig::from(c))
    }

    /// Build from config: validate, read the credentials, resolve the hosts.
    pub fn from_pool(c: &PoolConfig) -> std::result::Result<Upstream, String> {
        c.validate()?;
        let models = c
            .models
            .iter()
            .map(|m| ModelPattern::parse(m))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| format!("upstream {:?}: models: {e}", c.name))?;
        let mut targets = c
            .target_list()?
            .iter()
            .enumerate()
            .map(|(i, t)| Target::from_config(c, i, t))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // Two credentials for one host share a label: tell them apart by index.
        let labels: Vec<String> = targets.iter().map(|t| t.label.clone()).collect();
        for (i, t) in targets.iter_mut().enumerate() {
            if labels.iter().filter(|l| **l == t.label).count() > 1 {
                t.label = format!("{}#{i}", t.label);
            }
        }
        let mut priorities: Vec<u32> = targets.iter().map(|t| t.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let levels = priorities
            .iter()
            .map(|p| {
                (0..targets.len())
                    .filter(|i| targets[*i].priority == *p)
                    .collect()
            })
            .collect::<Vec<_>>();
        let troubles = Arc::new(AtomicU64::new(0));
        for t in &mut targets {
            t.state.troubles = troubles.clone();
        }
        Ok(Upstream {
            name: c.name.clone(),
            url: targets[0].url.clone(),
            models,
            calm: Calm::new(&targets, &levels),
            levels,
            counter: AtomicU64::new(0),
            troubles,
            calm_at: AtomicU64::new(0),
            calm_checked: AtomicU64::new(0),
            retry: RetryPolicy::new(&c.retry_policy()),
            eject_after: c.health.as_ref().map_or(3, |h| h.unhealthy_after),
            health: c.health.clone(),
            targets,
        })
    }

    /// Whether this upstream serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|p| p.matches(model))
    }

    /// The exact model names this upstream lists (for `/v1/models`).
    pub fn exact_models(&self) -> impl Iterator<Item = &str> {
        self.models.iter().filter_map(|p| match p {
            ModelPattern::Exact(e) => Some(&**e),
            _ => None,
        })
    }

    /// Choose the target for an attempt, avoiding those in `tried` (a bit per target) while
    /// others are available.
    ///
    /// While no trouble has come since every target was last seen clear, a first attempt
    /// needs neither the clock nor the targets' states: the pick is the weighted round-robin
    /// over the first priority, exactly as [`select`] would choose it.
    #[inline]
    pub fn select(&self, tried: u64) -> Pick {
        let troubles = self.troubles.load(Ordering::Acquire);
        if tried == 0 && troubles == self.calm_at.load(Ordering::Relaxed) {
            if let Some(i) = self.calm.pick(self.counter.fetch_add(1, Ordering::Relaxed)) {
                return Pick::Target(i);
            }
        }
        let now = now_ms();
        let pick = select(&self.targets, &self.levels, &self.counter, now, tried, 0);
        if self.calm_checked.load(Ordering::Relaxed) != now
            && self.calm_checked.swap(now, Ordering::Relaxed) != now
            && self.targets.iter().all(|t| t.state.clear(now))
        {
            // Clear again (cooldowns over, ejected targets probed back): the fast choice
            // holds until the next trouble, which bumps `troubles` past this value.
            self.calm_at.store(troubles, Ordering::Relaxed);
        }
        pick
    }

    /// Choose the target for the attempt that retries target `failed`: another one, untried
    /// ones first (SPEC §11: a retry goes to another target, not one already tried while
    /// others remain).
    #[inline]
    pub fn select_retry(&self, tried: u64, failed: usize) -> Pick {
        let tried = tried | 1 << failed;
        select(
            &self.targets,
            &self.levels,
            &self.counter,
            now_ms(),
            tried,
            1 << failed,
        )
    }

    /// Whether some target other than those in `tried` could take an attempt now.
    pub fn has_other(&self, tried: u64) -> bool {
        let now = now_ms();
        self.targets
            .iter()
            .enumerate()
            .any(|(i, t)| tried & (1 << i) == 0 && t.weight > 0 && t.state.available(now))
    }

    /// The labels of the targets in service: not ejected (nor ejected and waiting for their
    /// probe), passing their health check.
    pub fn healthy_targets(&self) -> Vec<&str> {
        self.targets
            .iter()
            .filter(|t| t.state.in_service())
            .map(|t| t.label.as_str())
            .collect()
    }
}

/// The choice while every target is clear: the first priority with a weight above 0, as
/// target indices and the running sums of their weights (targets of weight 0 left out).
#[derive(Debug, Default)]
struct Calm {
    targets: Box<[usize]>,
    sums: Box<[u64]>,
}

impl Calm {
    fn new(targets: &[Target], levels: &[Box<[usize]>]) -> Calm {
        let Some(level) = levels
            .iter()
            .find(|l| l.iter().any(|i| targets[*i].weight > 0))
        else {
            return Calm::default();
        };
        let chosen: Box<[usize]> = level
            .iter()
            .copied()
            .filter(|i| targets[*i].weight > 0)
            .collect();
        let sums = chosen
            .iter()
            .scan(0u64, |sum, i| {
                *sum += u64::from(targets[*i].weight);
                Some(*sum)
            })
            .collect();
        Calm {
            targets: chosen,
            sums,
        }
    }

    /// The target for the `n`th pick: what [`select`] chooses when every target is available.
    #[inline]
    fn pick(&self, n: u64) -> Option<usize> {
        let total = *self.sums.last()?;
        let r = n % total;
        let at = self.sums.partition_point(|s| *s <= r);
        self.targets.get(at).copied()
    }
}

/// The upstreams, in config order.
#[derive(Debug, Default)]
pub struct Upstreams {
    list: Arc<Vec<Upstream>>,
}

impl Upstreams {
    /// Build pools of one from the plugin API's single-URL configs.
    pub fn from_config(list: &[UpstreamConfig]) -> std::result::Result<Upstreams, String> {
        Ok(Upstreams {
            list: Arc::new(
                list.iter()
                    .map(Upstream::from_config)
                    .collect::<std::result::Result<_, _>>()?,
            ),
        })
    }

    /// Build all pools from the config file's `upstreams`.
    pub fn from_pools(list: &[PoolConfig]) -> std::result::Result<Upstreams, String> {
        Ok(Upstreams {
            list: Arc::new(
                list.iter()
                    .map(Upstream::from_pool)
                    .collect::<std::result::Result<_, _>>()?,
            ),
        })
    }

    /// The first upstream whose models match `model`.
    #[inline]
    pub fn route(&self, model: &str) -> Option<usize> {
        self.list.iter().position(|u| u.serves(model))
    }

    /// The upstream at `index`.
    pub fn get(&self, index: usize) -> Option<&Upstream> {
        self.list.get(index)
    }

    /// Start the active health checks of the pools that configure one (a thread of their
    /// own); `None` when none does.
    pub fn start_health_checks(&self) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
        spawn_health_checks(self.list.clone())
    }

    /// All upstreams.
    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> Upstream {
        Upstream::from_pool(&serde_norway::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn the_split_follows_the_weights() {
        let u = pool("name: p\nmodels: ['*']\ntargets:\n  - {url: 'http://127.0.0.1:1', weight: 3}\n  - {url: 'http://127.0.0.1:2', weight: 1}\n  - {url: 'http://127.0.0.1:3', weight: 6}\n");
        let mut seen = [0u32; 3];
        for _ in 0..1000 {
            let Pick::Target(i) = u.select(0) else {
                panic!()
            };
            seen[i] += 1;
        }
        assert_eq!(seen, [300, 100, 600]);
    }

    #[test]
    fn priority_zero_first_then_the_next_when_it_is_out() {
        let u = pool("name: p\nmodels: ['*']\ntargets:\n  - {url: 'http://127.0.0.1:1', priority: 1}\n  - {url: 'http://127.0.0.1:2'}\n");
        for _ in 0..10 {
            assert_eq!(u.select(0), Pick::Target(1));
        }
        // Tried already: another one while others remain.
        assert_eq!(u.select(0b10), Pick::Target(0));
        u.targets[1]
            .state
            .cool_down(std::time::Duration::from_secs(30));
        assert_eq!(u.select(0), Pick::Target(0));
        // Every target cooling: the soonest end.
        u.targets[0]
            .state
            .cool_down(std::time::Duration::from_secs(10));
        let Pick::Cooling(until) = u.select(0) else {
            panic!()
        };
        assert!(until >= now_ms() + 9_000 && until <= now_ms() + 10_000);
    }

    #[test]
    fn cooldowns_are_extended_never_shortened() {
        let u = pool("name: p\nurl: http://127.0.0.1:1\nmodels: ['*']\n");
        let s = &u.targets[0].state;
        assert!(s.cool_down(std::time::Duration::from_secs(30)));
        let until = s.cooling_until.load(std::sync::atomic::Ordering::Relaxed);
        assert!(!s.cool_down(std::time::Duration::from_secs(5)));
        assert_eq!(
            s.cooling_until.load(std::sync::atomic::Ordering::Relaxed),
            until
        );
        assert!(s.cool_down(std::time::Duration::from_secs(60)));
    }

    #[test]
    fn consecutive_failures_eject_with_a_growing_back_off_and_all_down_tries_the_oldest_failure() {
        let u = pool("name: p\nmodels: ['*']\ntargets:\n  - {url: 'http://127.0.0.1:1'}\n  - {url: 'http://127.0.0.1:2'}\n");
        let (a, b) = (&u.targets[0].state, &u.targets[1].state);
        assert!(!a.failed(3) && !a.failed(3) && a.failed(3));
        let first = a.down_until.load(std::sync::atomic::Ordering::Relaxed) - now_ms();
        assert_eq!(u.select(0), Pick::Target(1));
        // Calls sent before the ejection fail after it: no new ejection each.
        let until = a.down_until.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..10 {
            assert!(!a.failed(3), "a call of before the ejection");
        }
        assert_eq!(
            a.down_until.load(std::sync::atomic::Ordering::Relaxed),
            until
        );
        // The back-off ran out and the probe failed: ejected again, for longer.
        a.down_until
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        a.claim_probe(now_ms());
        assert!(a.failed(3), "the probe failed: ejected again");
        let second = a.down_until.load(std::sync::atomic::Ordering::Relaxed) - now_ms();
        assert!(second > first, "{second} > {first}");
        std::thread::sleep(std::time::Duration::from_millis(2));
        for _ in 0..3 {
            b.failed(3);
        }
        // Both down: the one that failed longest ago.
        assert_eq!(u.select(0), Pick::Target(0));
        a.succeeded();
        assert!(a.up(now_ms()));
        assert_eq!(u.healthy_targets(), ["127.0.0.1:1"]);
    }

    #[test]
    fn an_ejected_target_is_out_of_service_until_its_probe_answers() {
        let u = pool("name: p\nmodels: ['*']\ntargets:\n  - {url: 'http://127.0.0.1:1'}\n  - {url: 'http://127.0.0.1:2'}\n");
        let a = &u.targets[0].state;
        for _ in 0..3 {
            a.failed(3);
        }
        assert_eq!(u.healthy_targets(), ["127.0.0.1:2"]);
        // The back-off ran out: it may take its probe, but it is not back yet.
        a.down_until
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        assert!(a.available(now_ms() + 1));
        assert_eq!(u.healthy_targets(), ["127.0.0.1:2"]);
        a.succeeded();
        assert_eq!(u.healthy_targets(), ["127.0.0.1:1", "127.0.0.1:2"]);
    }

    #[test]
    fn the_calm_choice_is_the_one_the_full_choice_makes() {
        let mut yaml = String::from("name: p\nmodels: ['*']\ntargets:\n");
        for i in 0..16 {
            let (w, p) = (i % 4, i / 12);
            yaml.push_str(&format!(
                "  - {{url: 'http://127.0.0.1:{}', weight: {w}, priority: {p}}}\n",
                1 + i
            ));
        }
        let u = pool(&yaml);
        for n in 0..200 {
            let full = select(&u.targets, &u.levels, &AtomicU64::new(n), now_ms(), 0, 0);
            assert_eq!(full, Pick::Target(u.calm.pick(n).unwrap()), "{n}");
        }
    }

    #[test]
    fn trouble_leaves_the_calm_choice_until_every_target_is_clear_again() {
        let u = pool("name: p\nmodels: ['*']\ntargets:\n  - {url: 'http://127.0.0.1:1'}\n  - {url: 'http://127.0.0.1:2'}\n");
        let calm = || u.troubles.load(Ordering::Relaxed) == u.calm_at.load(Ordering::Relaxed);
        assert!(calm());
        u.targets[0]
            .state
            .cool_down(std::time::Duration::from_millis(30));
        assert!(!calm());
        for _ in 0..4 {
            assert_eq!(u.select(0), Pick::Target(1));
        }
        assert!(!calm(), "still cooling");
        std::thread::sleep(std::time::Duration::from_millis(40));
        u.select(0);
        assert!(calm(), "the cooldown is over");
        assert!(u.targets[1].state.set_health_down(true));
        assert!(!calm());
        for _ in 0..4 {
            assert_eq!(u.select(0), Pick::Target(0));
        }
        assert!(u.targets[1].state.set_health_down(false));
        // The full choice looks at most once a millisecond.
        let next_ms = || std::thread::sleep(std::time::Duration::from_millis(2));
        next_ms();
        u.select(0);
        assert!(calm());
        // An ejection holds it off until the probe answers, not merely until it runs out.
        for _ in 0..3 {
            u.targets[0].state.failed(3);
        }
        u.targets[0]
            .state
            .down_until
            .store(now_ms(), Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(2));
        u.select(0);
        assert!(!calm(), "ran out, not probed yet");
        u.targets[0].state.succeeded();
        next_ms();
        u.select(0);
        assert!(calm());
    }

    #[test]
    fn a_retry_goes_to_another_target_never_the_one_that_failed() {
        let u = pool("name: p\nmodels: ['*']\ntargets:\n  - {url: 'http://127.0.0.1:1'}\n  - {url: 'http://127.0.0.1:2'}\n");
        for _ in 0..10 {
            // Both tried: the one that did not just fail.
            assert_eq!(u.select_retry(0b11, 1), Pick::Target(0));
            assert_eq!(u.select_retry(0b11, 0), Pick::Target(1));
            assert_eq!(u.select_retry(0, 0), Pick::Target(1));
        }
        // No other target: no retry.
        assert!(u.has_other(0b01));
        let one = pool("name: p\nurl: http://127.0.0.1:1\nmodels: ['*']\n");
        assert!(!one.has_other(0b1));
    }
}
