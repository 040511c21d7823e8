//! Running a whole signal through an instance the way a host does: in blocks of chosen sizes,
//! with the transport moving block by block and events at absolute sample positions.

use crate::host::{HostEvent, PluginInstance, StereoBuffer};
use crate::transport::Transport;
use anyhow::{ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a signal is cut into blocks.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockSplit {
    /// Every block this long (the last one may be shorter).
    Fixed(usize),
    /// Random lengths in `1..=max`, reproducible from `seed`.
    Random {
        /// Seed of the length sequence.
        seed: u64,
        /// Longest block.
        max: usize,
    },
    /// These lengths, cycled.
    Sizes(Vec<usize>),
}

impl BlockSplit {
    /// Block lengths covering `total` samples.
    pub fn lengths(&self, total: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut done = 0;
        let mut rng = match self {
            BlockSplit::Random { seed, .. } => Some(StdRng::seed_from_u64(*seed)),
            _ => None,
        };
        let mut i = 0;
        while done < total {
            let want = match self {
                BlockSplit::Fixed(n) => *n,
                BlockSplit::Random { max, .. } => {
                    rng.as_mut().map_or(1, |r| r.random_range(1..=*max))
                }
                BlockSplit::Sizes(sizes) => sizes[i % sizes.len()],
            }
            .max(1);
            let len = want.min(total - done);
            out.push(len);
            done += len;
            i += 1;
        }
        out
    }

    /// The longest block this split produces (what the instance must be activated for).
    pub fn max_len(&self) -> usize {
        match self {
            BlockSplit::Fixed(n) => *n,
            BlockSplit::Random { max, .. } => *max,
            BlockSplit::Sizes(sizes) => sizes.iter().copied().max().unwrap_or(1),
        }
        .max(1)
    }
}

/// A signal to run through an instance.
#[derive(Debug, Clone)]
pub struct RenderRequest<'a> {
    /// Main input, two channels of equal length (or empty for silence).
    pub main: [&'a [f32]; 2],
    /// Sidechain input, two channels (or empty for silence).
    pub sidechain: [&'a [f32]; 2],
    /// Transport at the first sample; it advances with every block, wrapping at its loop end
    /// with a transport event at the exact sample. A [`HostEvent::Transport`] in `events` (a
    /// seek) takes over from its sample on (no automatic loop wrap is added to a block that has
    /// one). `None`: no transport at all.
    pub transport: Option<Transport>,
    /// Events at absolute sample positions, sorted by time.
    pub events: Vec<HostEvent>,
    /// Block lengths.
    pub split: BlockSplit,
    /// Cut a block where the transport jumps (a scripted seek or a loop wrap) so the jump falls
    /// on a block start, as many hosts do, instead of announcing it with an event inside the
    /// block. nice-plug 0.4.2 misplaces the position after an in-block transport event (it adds
    /// the event's offset to a position that already holds at that offset).
    pub split_at_transport_changes: bool,
    /// Hand the blocks over no faster than real time (a block is processed once the wall-clock
    /// time since the render started reaches its first sample), as a live host does: what the
    /// plugin generates meanwhile arrives at the pace it would while a musician listens.
    pub real_time: bool,
}

impl<'a> RenderRequest<'a> {
    /// A request for `main` and `sidechain` (either may be `[&[], &[]]`) in `split` blocks, with
    /// no transport and no events.
    pub fn new(main: [&'a [f32]; 2], sidechain: [&'a [f32]; 2], split: BlockSplit) -> Self {
        Self {
            main,
            sidechain,
            transport: None,
            events: Vec::new(),
            split,
            split_at_transport_changes: false,
            real_time: false,
        }
    }

    /// Paces the blocks in real time; see [`RenderRequest::real_time`].
    pub fn in_real_time(mut self) -> Self {
        self.real_time = true;
        self
    }

    /// Cuts blocks at transport jumps; see [`RenderRequest::split_at_transport_changes`].
    pub fn splitting_at_transport_changes(mut self) -> Self {
        self.split_at_transport_changes = true;
        self
    }

    /// Sets the transport at the first sample.
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Adds events (absolute positions); they are kept sorted.
    pub fn with_events(mut self, events: impl IntoIterator<Item = HostEvent>) -> Self {
        self.events.extend(events);
        self.events.sort_by_key(|e| e.time());
        self
    }

    fn len(&self) -> Result<usize> {
        let lens: Vec<usize> = self
            .main
            .iter()
            .chain(&self.sidechain)
            .map(|c| c.len())
            .filter(|l| *l > 0)
            .collect();
        let len = *lens
            .first()
            .context("render request without any input audio")?;
        ensure!(
            lens.iter().all(|l| *l == len),
            "input channels differ in length: {lens:?}"
        );
        Ok(len)
    }
}

/// Runs `request` through `instance` (which must be active with a block size of at least
/// `request.split.max_len()`) and returns the whole output.
pub fn render<'a>(
    instance: &mut PluginInstance,
    request: &RenderRequest<'a>,
) -> Result<StereoBuffer> {
    let total = request.len()?;
    let sample_rate = instance
        .sample_rate()
        .context("render on an inactive instance")?;
    let max_block = instance.max_block().unwrap_or(0);
    ensure!(
        request.split.max_len() <= max_block,
        "split up to {} frames but activated for {max_block}",
        request.split.max_len()
    );
    let mut out: StereoBuffer = [Vec::with_capacity(total), Vec::with_capacity(total)];
    let mut transport = request.transport;
    let mut start = 0usize;
    let mut next_event = 0usize;
    let mut block_events = Vec::new();
    let mut lengths: std::collections::VecDeque<usize> = request.split.lengths(total).into();
    let started = std::time::Instant::now();
    while let Some(mut len) = lengths.pop_front() {
        if request.real_time {
            let due = std::time::Duration::from_secs_f64(start as f64 / sample_rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if request.split_at_transport_changes {
            // The first jump strictly inside the block: a scripted transport event or the wrap.
            let scripted = request.events[next_event..]
                .iter()
                .filter(|e| matches!(e, HostEvent::Transport { .. }))
                .map(|e| e.time() as usize)
                .find(|&t| t > start);
            let wrap = transport
                .and_then(|t| t.samples_to_loop_end(sample_rate))
                .map(|to_end| start + to_end.ceil() as usize);
            let cut = [scripted, wrap]
                .into_iter()
                .flatten()
                .filter(|&t| t > start && t < start + len)
                .min();
            if let Some(cut) = cut {
                lengths.push_front(start + len - cut);
                len = cut - start;
            }
        }
        let end = start + len;
        block_events.clear();
        while next_event < request.events.len()
            && (request.events[next_event].time() as usize) < end
        {
            let e = request.events[next_event];
            block_events.push(e.at(e.time() - start as u32));
            next_event += 1;
        }
        // A scripted transport change inside the block (a seek) replaces the running transport
        // from its sample on.
        let scripted = block_events.iter().rev().find_map(|e| match *e {
            HostEvent::Transport { time, transport } => Some((time as usize, transport)),
            _ => None,
        });
        let block_transport = transport;
        if let Some((time, t)) = scripted {
            transport = Some(t.advanced(len - time, sample_rate));
        } else if let Some(t) = transport {
            // A loop wrap inside the block: the host announces the jump at its exact sample.
            if let Some(to_end) = t.samples_to_loop_end(sample_rate) {
                let wrap_at = to_end.ceil() as usize;
                if wrap_at > 0 && wrap_at < len {
                    let wrapped = t.advanced(wrap_at, sample_rate);
                    block_events.push(HostEvent::Transport {
                        time: wrap_at as u32,
                        transport: wrapped,
                    });
                    block_events.sort_by_key(|e| e.time());
                }
            }
            transport = Some(t.advanced(len, sample_rate));
        }
        let slice = |c: &[&'a [f32]; 2]| -> Vec<&'a [f32]> {
            if c[0].is_empty() {
                Vec::new()
            } else {
                c.iter().map(|ch| &ch[start..end]).collect()
            }
        };
        let main = slice(&request.main);
        let side = slice(&request.sidechain);
        let block = instance
            .process_block(&main, &side, block_transport.as_ref(), &block_events)
            .with_context(|| format!("block {start}..{end}"))?;
        for (o, b) in out.iter_mut().zip(block) {
            o.extend_from_slice(&b);
        }
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_signal() {
        for split in [
            BlockSplit::Fixed(64),
            BlockSplit::Fixed(1),
            BlockSplit::Random { seed: 3, max: 700 },
            BlockSplit::Sizes(vec![3, 500, 1]),
        ] {
            let lengths = split.lengths(10_007);
            assert_eq!(lengths.iter().sum::<usize>(), 10_007, "{split:?}");
            assert!(lengths.iter().all(|l| *l >= 1 && *l <= split.max_len()));
        }
        let random = BlockSplit::Random { seed: 3, max: 700 }.lengths(100_000);
        let distinct: std::collections::BTreeSet<_> = random.iter().collect();
        assert!(
            distinct.len() > 50,
            "random split is not random: {distinct:?}"
        );
        assert_eq!(
            random,
            BlockSplit::Random { seed: 3, max: 700 }.lengths(100_000)
        );
    }
}
