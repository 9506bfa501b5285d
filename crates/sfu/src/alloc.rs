//! Which layer of which video a subscriber gets: the tile size it shows and its bandwidth
//! estimate decide, shared by priority (screen share, dominant speaker, other cameras).

/// A publisher's layer as the allocator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerInfo {
    /// Picture width from the layer's keyframes; 0 when not seen yet.
    pub width: u32,
    /// Measured bitrate in bit/s; 0 when not measured yet.
    pub bitrate: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// The subscriber does not show this video.
    Hidden,
    /// Shown this wide (device pixels).
    Width(u32),
    /// No view reported: the best the bandwidth allows.
    Best,
}

#[derive(Debug, Clone)]
pub(crate) struct Demand {
    /// Lower is served first.
    pub priority: u8,
    /// A screen share: without simulcast, it is assumed at [`DEFAULT_SCREEN`] until measured.
    pub screen: bool,
    /// Lowest layer first; one entry without simulcast.
    pub layers: Vec<LayerInfo>,
    pub want: Want,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    Layer(usize),
    Hidden,
    /// Not even the lowest layer fits the bandwidth.
    Paused,
}

/// Assumed width of the top layer before any keyframe told us.
const DEFAULT_TOP_WIDTH: u32 = 1280;
/// Assumed bitrates, top layer first, before any was measured.
const DEFAULT_BITRATES: [u64; 3] = [1_200_000, 400_000, 120_000];
/// Assumed bitrate of a video without simulcast before it was measured.
const DEFAULT_SINGLE: u64 = 300_000;
/// Assumed bitrate of a screen share without simulcast before it was measured (its first
/// half second): a browser's share of slides or code runs at 1-2.5 Mbit/s. Assuming less made
/// a new viewer's bandwidth estimator ask for little, so that its first probes, capped at twice
/// that, measured under 1 Mbit/s and paused the share it was about to get.
const DEFAULT_SCREEN: u64 = 1_500_000;

fn widths(layers: &[LayerInfo]) -> Vec<u32> {
    let n = layers.len();
    let top = layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.width > 0)
        .map(|(i, l)| l.width << (n - 1 - i))
        .max()
        .unwrap_or(DEFAULT_TOP_WIDTH);
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if l.width > 0 {
                l.width
            } else {
                top >> (n - 1 - i)
            }
        })
        .collect()
}

/// A layer's measured bitrate, or an assumed one before it was measured.
pub(crate) fn layer_bitrate(d: &Demand, i: usize) -> u64 {
    let layers = &d.layers;
    let from_top = layers.len() - 1 - i;
    match layers[i].bitrate {
        0 if layers.len() == 1 && d.screen => DEFAULT_SCREEN,
        0 if layers.len() == 1 => DEFAULT_SINGLE,
        0 => DEFAULT_BITRATES[from_top.min(DEFAULT_BITRATES.len() - 1)],
        b => b,
    }
}

/// Chooses a layer for each demand within `budget` bit/s (`None`: no estimate yet).
pub(crate) fn allocate(budget: Option<u64>, demands: &[Demand]) -> Vec<Choice> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|i| demands[*i].priority);
    let mut remaining = budget.unwrap_or(u64::MAX);
    let mut out = vec![Choice::Hidden; demands.len()];
    for i in order {
        let d = &demands[i];
        if d.layers.is_empty() {
            out[i] = Choice::Paused;
            continue;
        }
        let desired = match d.want {
            Want::Hidden => continue,
            Want::Best => d.layers.len() - 1,
            Want::Width(w) => {
                let ws = widths(&d.layers);
                // The smallest layer at least 3/4 as wide as the tile looks as sharp.
                ws.iter()
                    .position(|lw| u64::from(*lw) * 4 >= u64::from(w) * 3)
                    .unwrap_or(d.layers.len() - 1)
            }
        };
        out[i] = Choice::Paused;
        for l in (0..=desired).rev() {
            let b = layer_bitrate(d, l);
            if b <= remaining {
                remaining -= b;
                out[i] = Choice::Layer(l);
                break;
            }
        }
        // A single-layer video (a screen share) has nothing smaller to fall back to, and an
        // estimate only grows while media flows: it goes on at half its rate or more (the
        // pacer and the send-queue guard absorb the difference), taking what is left.
        if out[i] == Choice::Paused && d.layers.len() == 1 && remaining >= layer_bitrate(d, 0) / 2 {
            remaining = 0;
            out[i] = Choice::Layer(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(widths: [u32; 3]) -> Vec<LayerInfo> {
        widths
            .iter()
            .zip([150_000, 500_000, 1_500_000])
            .map(|(w, b)| LayerInfo {
                width: *w,
                bitrate: b,
            })
            .collect()
    }

    fn cam(want: Want) -> Demand {
        Demand {
            priority: 2,
            screen: false,
            layers: sim([320, 640, 1280]),
            want,
        }
    }

    #[test]
    fn a_single_layer_share_goes_on_at_half_its_rate_but_not_below() {
        let share = |bitrate| Demand {
            priority: 1,
            screen: true,
            layers: vec![LayerInfo {
                width: 1920,
                bitrate,
            }],
            want: Want::Best,
        };
        assert_eq!(
            allocate(Some(1_000_000), &[share(1_600_000)]),
            vec![Choice::Layer(0)]
        );
        assert_eq!(
            allocate(Some(700_000), &[share(1_600_000)]),
            vec![Choice::Paused]
        );
        // Simulcast cameras still pause when even their lowest layer does not fit.
        assert_eq!(
            allocate(Some(100_000), &[cam(Want::Best)]),
            vec![Choice::Paused]
        );
    }

    #[test]
    fn tile_size_picks_the_layer() {
        let d = [
            cam(Want::Width(200)),
            cam(Want::Width(600)),
            cam(Want::Width(1920)),
            cam(Want::Hidden),
        ];
        assert_eq!(
            allocate(None, &d),
            vec![
                Choice::Layer(0),
                Choice::Layer(1),
                Choice::Layer(2),
                Choice::Hidden
            ]
        );
    }

    #[test]
    fn bandwidth_caps_the_layer_and_pauses_below_the_lowest() {
        assert_eq!(
            allocate(Some(700_000), &[cam(Want::Best)]),
            vec![Choice::Layer(1)]
        );
        assert_eq!(
            allocate(Some(160_000), &[cam(Want::Best)]),
            vec![Choice::Layer(0)]
        );
        assert_eq!(
            allocate(Some(30_000), &[cam(Want::Best)]),
            vec![Choice::Paused]
        );
    }

    #[test]
    fn screen_share_is_served_before_cameras() {
        let screen = Demand {
            priority: 0,
            screen: true,
            layers: vec![LayerInfo {
                width: 1920,
                bitrate: 1_000_000,
            }],
            want: Want::Best,
        };
        let got = allocate(Some(1_200_000), &[cam(Want::Best), screen]);
        assert_eq!(got, vec![Choice::Layer(0), Choice::Layer(0)]);
    }

    #[test]
    fn an_unmeasured_share_is_assumed_at_a_shares_bitrate() {
        let single = |screen| Demand {
            priority: if screen { 0 } else { 2 },
            screen,
            layers: vec![LayerInfo {
                width: 0,
                bitrate: 0,
            }],
            want: Want::Best,
        };
        assert_eq!(layer_bitrate(&single(true), 0), DEFAULT_SCREEN);
        assert_eq!(layer_bitrate(&single(false), 0), DEFAULT_SINGLE);
        // Going on at half its rate: a share needs 0.75 Mbit/s before it is measured.
        assert_eq!(
            allocate(Some(600_000), &[single(true)]),
            vec![Choice::Paused]
        );
        assert_eq!(
            allocate(Some(800_000), &[single(true)]),
            vec![Choice::Layer(0)]
        );
    }

    #[test]
    fn unknown_widths_and_bitrates_are_assumed() {
        let d = Demand {
            priority: 2,
            screen: false,
            layers: vec![
                LayerInfo {
                    width: 0,
                    bitrate: 0
                };
                3
            ],
            want: Want::Width(300),
        };
        assert_eq!(allocate(None, &[d]), vec![Choice::Layer(0)]);
    }
}
