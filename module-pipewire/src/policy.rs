//! Which apps of the guest's graph are tapped, and how: the module's decisions as plain
//! data, without PipeWire.
//!
//! [`GraphPolicy`] is told what the session's registry shows (nodes, their app info,
//! ports, links, removals), each fact with the time it was seen, and answers with the
//! [`Action`]s that follow; the adapter (`guest.rs`) carries them out on PipeWire and
//! says when one failed ([`GraphPolicy::tap_failed`], [`GraphPolicy::link_failed`]).
//! Nothing here sleeps or reads a clock, so every rule is tested without a daemon.
//!
//! The rules:
//! - An app is any node with an output port linked into one of our two sinks (the
//!   redirect sink and the standby) that is not ours (our sinks, our microphone),
//!   whatever its API or `media.class`: what feeds the sinks is what the user would
//!   hear. It is tapped once its info (name, role...) is known.
//! - A tap closes when its app goes, when the app is linked to another sink (moved
//!   away), or when the app stays linked to none for [`MOVE_GRACE`]. A move between
//!   our two sinks keeps it.
//! - WirePlumber links a tap to an app that has a `media.class`. To one without (a
//!   JACK client) the module links the tap itself: each link from one of the app's
//!   output ports into a sink's input port of channel C gets a twin from that output
//!   port into the tap's input port of channel C. A twin whose original went is
//!   dropped; one that was seen in the registry and then destroyed by someone else is
//!   made again.
//! - The microphone is wanted while a link leaves our microphone's node (an app
//!   records from it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use melange_transport::message::AppInfo;

/// How long a tap outlives its app's last link to our sinks while the app is linked to
/// nothing: WirePlumber moves a stream by unlinking it first, and an app moved from
/// one of our sinks to the other keeps its tap (and its host stream) through it.
pub const MOVE_GRACE: Duration = Duration::from_millis(300);

/// The `node.name` of the tap on the app whose `object.serial` is `serial`: the policy
/// knows a tap's node by it.
pub fn tap_node_name(serial: &str) -> String {
    format!("melange.tap.{serial}")
}

/// The `node.name`s of the module's own nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnNames {
    /// The redirect sink (`sink.name`).
    pub sink: String,
    /// The standby sink.
    pub standby: String,
    /// The virtual microphone.
    pub mic: String,
    /// The virtual camera.
    pub camera: String,
}

/// What the registry says of a new node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFacts<'a> {
    /// `media.class`, empty where it has none.
    pub class: &'a str,
    /// `node.name`, empty where it has none.
    pub name: &'a str,
    /// `object.serial`, empty where it has none.
    pub serial: &'a str,
}

/// One of the module's own nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnNode {
    /// The redirect sink.
    RedirectSink,
    /// The standby sink.
    StandbySink,
    /// The virtual microphone.
    Microphone,
    /// The virtual camera.
    Camera,
}

/// What a new node is to the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// One of ours: never tapped.
    Own(OwnNode),
    /// The node of one of our taps.
    Tap,
    /// Any other node: it may feed our sinks. The adapter watches it for its app info
    /// ([`GraphPolicy::app_info`]).
    Candidate,
}

/// What the registry says of a new link: its nodes, and its ports where it says them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFacts {
    /// `link.output.node`.
    pub out_node: u32,
    /// `link.input.node`.
    pub in_node: u32,
    /// `link.output.port`.
    pub out_port: Option<u32>,
    /// `link.input.port`.
    pub in_port: Option<u32>,
}

/// What the adapter is to do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a tap on app node `app`. WirePlumber links it to the app (the tap's
    /// `target.object` is `serial`), or, if `manual`, the module does ([`Action::Link`]).
    /// The tap's node is named [`tap_node_name`]`(serial)`. If it cannot be opened, say
    /// so with [`GraphPolicy::tap_failed`].
    OpenTap {
        /// The app's node id.
        app: u32,
        /// The app's `object.serial`.
        serial: String,
        /// What the host is told of the app.
        info: AppInfo,
        /// Whether the module links the tap (the app has no `media.class`).
        manual: bool,
    },
    /// Close the tap on `app`, with the links made for it.
    CloseTap {
        /// The app's node id.
        app: u32,
    },
    /// Tell the host whether an app records from the virtual microphone.
    WantMic(bool),
    /// Tell the host whether an app captures from the virtual camera.
    WantCamera(bool),
    /// Link `app`'s output port `out_port` to input port `tap_port` of its tap's node
    /// `tap_node`. If the link cannot be made, say so with [`GraphPolicy::link_failed`].
    Link {
        /// The app's node id.
        app: u32,
        /// The app's output port.
        out_port: u32,
        /// The tap's node id.
        tap_node: u32,
        /// The tap's input port.
        tap_port: u32,
    },
    /// Drop the link made earlier from `out_port` to `tap_port` for `app`'s tap.
    Unlink {
        /// The app's node id.
        app: u32,
        /// The app's output port.
        out_port: u32,
        /// The tap's input port.
        tap_port: u32,
    },
}

/// A node that may be an app.
#[derive(Debug)]
struct App {
    serial: String,
    /// Whether it has a `media.class` (see [`Action::OpenTap`]'s `manual`).
    has_class: bool,
    info: Option<AppInfo>,
}

/// A port seen in the registry.
#[derive(Debug)]
struct Port {
    node: u32,
    output: bool,
    /// `audio.channel` (FL, FR, ...), or `port.name` where it has none.
    channel: String,
}

/// A tap the adapter was told to open.
#[derive(Debug)]
struct Tap {
    /// Its node's `node.name`.
    node_name: String,
    /// `Some` when the module links the tap itself.
    manual: Option<ManualLinks>,
}

/// The links the module made for a tap whose app WirePlumber cannot link it to.
#[derive(Debug, Default)]
struct ManualLinks {
    /// The tap's own node, once the registry shows it.
    node: Option<u32>,
    /// Per (app's output port, tap's input port): whether the registry has shown the
    /// link yet (one that was shown and is gone was destroyed by someone else: it is
    /// made again).
    made: BTreeMap<(u32, u32), bool>,
}

/// The module's view of the guest's graph, and its decisions on it. See the module
/// documentation for the rules.
///
/// Feed it every registry fact as it comes ([`GraphPolicy::node_added`],
/// [`GraphPolicy::app_info`], [`GraphPolicy::port_added`], [`GraphPolicy::link_added`],
/// [`GraphPolicy::removed`]) and call [`GraphPolicy::tick`] a few times a second (that
/// is when taps whose [`MOVE_GRACE`] ran out close); carry out the actions each returns.
#[derive(Debug)]
pub struct GraphPolicy {
    names: OwnNames,
    sink: Option<u32>,
    standby: Option<u32>,
    mic: Option<u32>,
    camera: Option<u32>,
    /// Every `Audio/Sink` node, ours or not.
    sinks: BTreeSet<u32>,
    apps: BTreeMap<u32, App>,
    ports: BTreeMap<u32, Port>,
    links: BTreeMap<u32, LinkFacts>,
    /// Per app node: its tap.
    taps: BTreeMap<u32, Tap>,
    /// Tapped apps linked to no sink at all, and since when (see [`MOVE_GRACE`]).
    unlinked_since: BTreeMap<u32, Instant>,
    mic_wanted: bool,
    camera_wanted: bool,
}

impl GraphPolicy {
    /// A policy that knows the module's own nodes by `names`, and nothing of the graph yet.
    pub fn new(names: OwnNames) -> Self {
        Self {
            names,
            sink: None,
            standby: None,
            mic: None,
            camera: None,
            sinks: BTreeSet::new(),
            apps: BTreeMap::new(),
            ports: BTreeMap::new(),
            links: BTreeMap::new(),
            taps: BTreeMap::new(),
            unlinked_since: BTreeMap::new(),
            mic_wanted: false,
            camera_wanted: false,
        }
    }

    /// The redirect sink's node id, once the registry showed it.
    pub fn redirect_sink(&self) -> Option<u32> {
        self.sink
    }

    /// The standby sink's node id, once the registry showed it.
    pub fn standby_sink(&self) -> Option<u32> {
        self.standby
    }

    /// Which of the module's own nodes `id` is, if one.
    pub fn own_node(&self, id: u32) -> Option<OwnNode> {
        if self.sink == Some(id) {
            Some(OwnNode::RedirectSink)
        } else if self.standby == Some(id) {
            Some(OwnNode::StandbySink)
        } else if self.mic == Some(id) {
            Some(OwnNode::Microphone)
        } else if self.camera == Some(id) {
            Some(OwnNode::Camera)
        } else {
            None
        }
    }

    /// The registry shows node `id`. Says what it is; for a [`NodeRole::Candidate`] the
    /// adapter watches for its app info.
    pub fn node_added(&mut self, id: u32, node: NodeFacts<'_>, now: Instant) -> (NodeRole, Vec<Action>) {
        if node.class == "Audio/Sink" {
            self.sinks.insert(id);
        }
        if let Some(tap) = self.taps.values_mut().find(|t| t.node_name == node.name) {
            if let Some(manual) = &mut tap.manual {
                manual.node = Some(id);
            }
            return (NodeRole::Tap, self.reconcile(now));
        }
        if node.class == "Audio/Source" && node.name == self.names.mic {
            self.mic = Some(id);
            return (NodeRole::Own(OwnNode::Microphone), Vec::new());
        }
        if node.class == "Video/Source" && node.name == self.names.camera {
            self.camera = Some(id);
            return (NodeRole::Own(OwnNode::Camera), Vec::new());
        }
        if node.class == "Audio/Sink" && (node.name == self.names.sink || node.name == self.names.standby) {
            let own = if node.name == self.names.sink {
                self.sink = Some(id);
                OwnNode::RedirectSink
            } else {
                self.standby = Some(id);
                OwnNode::StandbySink
            };
            return (NodeRole::Own(own), self.reconcile(now));
        }
        // Any other node may feed our sinks: an app of any API (PipeWire, Pulse, ALSA,
        // JACK), a loopback, another sink's monitor.
        let app = App { serial: node.serial.to_string(), has_class: !node.class.is_empty(), info: None };
        self.apps.insert(id, app);
        (NodeRole::Candidate, Vec::new())
    }

    /// The info of candidate node `id` arrived (again: only the first time can it make
    /// a tap, a later one updates what a later tap is told).
    pub fn app_info(&mut self, id: u32, info: AppInfo, now: Instant) -> Vec<Action> {
        let Some(app) = self.apps.get_mut(&id) else { return Vec::new() };
        if app.info.replace(info).is_some() {
            return Vec::new();
        }
        self.reconcile(now)
    }

    /// The registry shows port `id` of `node`; `channel` is its `audio.channel`, or its
    /// `port.name` where it has none.
    pub fn port_added(&mut self, id: u32, node: u32, output: bool, channel: &str, now: Instant) -> Vec<Action> {
        self.ports.insert(id, Port { node, output, channel: channel.to_string() });
        self.reconcile(now)
    }

    /// The registry shows link `id`.
    pub fn link_added(&mut self, id: u32, link: LinkFacts, now: Instant) -> Vec<Action> {
        self.links.insert(id, link);
        self.reconcile(now)
    }

    /// Object `id` (a node, port or link) left the registry.
    pub fn removed(&mut self, id: u32, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.sink == Some(id) {
            self.sink = None;
        }
        if self.standby == Some(id) {
            self.standby = None;
        }
        if self.mic == Some(id) {
            self.mic = None;
        }
        if self.camera == Some(id) {
            self.camera = None;
        }
        self.sinks.remove(&id);
        self.unlinked_since.remove(&id);
        if self.taps.remove(&id).is_some() {
            actions.push(Action::CloseTap { app: id });
        }
        self.apps.remove(&id);
        self.links.remove(&id);
        self.ports.remove(&id);
        actions.extend(self.reconcile(now));
        actions
    }

    /// Time passed: closes the taps whose [`MOVE_GRACE`] ran out.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        self.reconcile(now)
    }

    /// The tap on `app` could not be opened: forgotten, so that the next look opens it
    /// again.
    pub fn tap_failed(&mut self, app: u32) {
        self.taps.remove(&app);
    }

    /// The link from `out_port` to `tap_port` for `app`'s tap could not be made:
    /// forgotten, so that the next look makes it again.
    pub fn link_failed(&mut self, app: u32, out_port: u32, tap_port: u32) {
        if let Some(manual) = self.taps.get_mut(&app).and_then(|t| t.manual.as_mut()) {
            manual.made.remove(&(out_port, tap_port));
        }
    }

    /// Whether an app records from the virtual microphone.
    pub fn mic_wanted(&self) -> bool {
        self.mic_wanted
    }

    /// Whether `app` has a tap (opened, or being opened).
    pub fn is_tapped(&self, app: u32) -> bool {
        self.taps.contains_key(&app)
    }

    /// Opens taps for the apps linked to either sink, closes the taps of apps linked to
    /// another sink, or to none for longer than [`MOVE_GRACE`], follows the
    /// microphone's demand and the links of manual taps.
    fn reconcile(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let ours = [self.sink, self.standby];
        let own = |id: u32| ours.contains(&Some(id)) || self.mic == Some(id) || self.camera == Some(id);
        let linked: BTreeSet<u32> = self
            .links
            .values()
            .filter(|l| ours.contains(&Some(l.in_node)) && !own(l.out_node))
            .map(|l| l.out_node)
            .collect();
        let elsewhere: BTreeSet<u32> = self
            .links
            .values()
            .filter(|l| self.sinks.contains(&l.in_node) && !ours.contains(&Some(l.in_node)))
            .map(|l| l.out_node)
            .collect();
        let unlinked: Vec<u32> = self.taps.keys().copied().filter(|id| !linked.contains(id)).collect();
        for id in unlinked {
            let since = *self.unlinked_since.entry(id).or_insert(now);
            if elsewhere.contains(&id) || now.saturating_duration_since(since) >= MOVE_GRACE {
                self.unlinked_since.remove(&id);
                self.taps.remove(&id);
                actions.push(Action::CloseTap { app: id });
            }
        }
        self.unlinked_since.retain(|id, _| !linked.contains(id));
        let recording = self.mic.is_some_and(|mic| self.links.values().any(|l| l.out_node == mic));
        if recording != self.mic_wanted {
            self.mic_wanted = recording;
            actions.push(Action::WantMic(recording));
        }
        let capturing = self.camera.is_some_and(|camera| self.links.values().any(|l| l.out_node == camera));
        if capturing != self.camera_wanted {
            self.camera_wanted = capturing;
            actions.push(Action::WantCamera(capturing));
        }
        for id in linked {
            if self.taps.contains_key(&id) {
                continue;
            }
            let Some(app) = self.apps.get(&id) else { continue };
            let Some(info) = app.info.clone() else { continue };
            let manual = !app.has_class;
            self.taps
                .insert(id, Tap { node_name: tap_node_name(&app.serial), manual: manual.then(ManualLinks::default) });
            actions.push(Action::OpenTap { app: id, serial: app.serial.clone(), info, manual });
        }
        self.link_manual_taps(&mut actions);
        actions
    }

    /// Follows, for each tap the module links itself, its app's links into our sinks:
    /// every link from one of the app's output ports into a sink's input port of
    /// channel C wants a twin from that output port into the tap's input port of
    /// channel C. A twin whose original went is dropped; one someone else destroyed
    /// after it was seen is made again.
    fn link_manual_taps(&mut self, actions: &mut Vec<Action>) {
        let ours = [self.sink, self.standby];
        let mut wanted: BTreeMap<u32, BTreeSet<(u32, u32)>> = BTreeMap::new();
        // The links into manual taps' nodes that the registry shows.
        let mut existing: BTreeSet<(u32, u32)> = BTreeSet::new();
        for (app, tap) in &self.taps {
            let Some(tap_node) = tap.manual.as_ref().and_then(|m| m.node) else { continue };
            let pairs = wanted.entry(*app).or_default();
            for link in self.links.values() {
                if let (Some(out_port), Some(in_port), true) = (link.out_port, link.in_port, link.in_node == tap_node) {
                    existing.insert((out_port, in_port));
                }
                if link.out_node != *app || !ours.contains(&Some(link.in_node)) {
                    continue;
                }
                let (Some(out_port), Some(in_port)) = (link.out_port, link.in_port) else { continue };
                let Some(channel) = self.ports.get(&in_port).map(|p| p.channel.as_str()) else { continue };
                let tap_port = self.ports.iter().find(|(_, p)| p.node == tap_node && !p.output && p.channel == channel);
                if let Some((tap_port, _)) = tap_port {
                    pairs.insert((out_port, *tap_port));
                }
            }
        }
        for (app, pairs) in wanted {
            let Some(manual) = self.taps.get_mut(&app).and_then(|t| t.manual.as_mut()) else { continue };
            let Some(tap_node) = manual.node else { continue };
            // Seen links are marked; twins no longer wanted, or destroyed after they
            // were seen, are dropped (and the latter made again below).
            manual.made.retain(|&(out_port, tap_port), seen| {
                let here = existing.contains(&(out_port, tap_port));
                *seen |= here;
                let keep = pairs.contains(&(out_port, tap_port)) && (here || !*seen);
                if !keep {
                    actions.push(Action::Unlink { app, out_port, tap_port });
                }
                keep
            });
            for (out_port, tap_port) in pairs {
                if manual.made.contains_key(&(out_port, tap_port)) {
                    continue;
                }
                manual.made.insert((out_port, tap_port), false);
                actions.push(Action::Link { app, out_port, tap_node, tap_port });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SINK: u32 = 10;
    const STANDBY: u32 = 11;
    const MIC: u32 = 12;
    /// Input ports FL and FR of the redirect sink, and of the standby.
    const SINK_FL: u32 = 13;
    const SINK_FR: u32 = 14;
    const STANDBY_FL: u32 = 15;
    /// A sink that is not ours (the guest's sound card).
    const CARD: u32 = 16;

    /// A graph with our two sinks, our microphone and a sound card, at `t0`.
    struct Graph {
        p: GraphPolicy,
        t0: Instant,
    }

    impl Graph {
        fn new() -> Self {
            let names = OwnNames {
                sink: "melange".into(),
                standby: "melange.standby".into(),
                mic: "melange.mic".into(),
                camera: "melange.camera".into(),
            };
            let mut g = Graph { p: GraphPolicy::new(names), t0: Instant::now() };
            assert_eq!(g.node(SINK, "Audio/Sink", "melange", "1").0, NodeRole::Own(OwnNode::RedirectSink));
            assert_eq!(g.node(STANDBY, "Audio/Sink", "melange.standby", "2").0, NodeRole::Own(OwnNode::StandbySink));
            assert_eq!(g.node(MIC, "Audio/Source", "melange.mic", "3").0, NodeRole::Own(OwnNode::Microphone));
            assert_eq!(g.node(CARD, "Audio/Sink", "alsa_output.pci", "4").0, NodeRole::Candidate);
            g.port(SINK_FL, SINK, false, "FL");
            g.port(SINK_FR, SINK, false, "FR");
            g.port(STANDBY_FL, STANDBY, false, "FL");
            g
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn node(&mut self, id: u32, class: &str, name: &str, serial: &str) -> (NodeRole, Vec<Action>) {
            self.node_at(0, id, class, name, serial)
        }

        fn node_at(&mut self, ms: u64, id: u32, class: &str, name: &str, serial: &str) -> (NodeRole, Vec<Action>) {
            let now = self.at(ms);
            self.p.node_added(id, NodeFacts { class, name, serial }, now)
        }

        fn info(&mut self, id: u32, name: &str) -> Vec<Action> {
            let now = self.at(0);
            self.p.app_info(id, app_info(name), now)
        }

        fn port(&mut self, id: u32, node: u32, output: bool, channel: &str) -> Vec<Action> {
            let now = self.at(0);
            self.p.port_added(id, node, output, channel, now)
        }

        fn link_at(&mut self, ms: u64, id: u32, out_node: u32, in_node: u32) -> Vec<Action> {
            let now = self.at(ms);
            self.p.link_added(id, LinkFacts { out_node, in_node, out_port: None, in_port: None }, now)
        }

        fn link(&mut self, id: u32, out_node: u32, in_node: u32) -> Vec<Action> {
            self.link_at(0, id, out_node, in_node)
        }

        fn port_link(
            &mut self,
            id: u32,
            (out_node, out_port): (u32, u32),
            (in_node, in_port): (u32, u32),
        ) -> Vec<Action> {
            let now = self.at(0);
            self.p.link_added(
                id,
                LinkFacts { out_node, in_node, out_port: Some(out_port), in_port: Some(in_port) },
                now,
            )
        }

        fn remove_at(&mut self, ms: u64, id: u32) -> Vec<Action> {
            let now = self.at(ms);
            self.p.removed(id, now)
        }

        fn remove(&mut self, id: u32) -> Vec<Action> {
            self.remove_at(0, id)
        }

        fn tick(&mut self, ms: u64) -> Vec<Action> {
            let now = self.at(ms);
            self.p.tick(now)
        }

        /// A PipeWire app (it has a media.class) at node `id`, serial `id + 1000`,
        /// linked to `sink` by link `id + 1` and its info known: returns the actions of
        /// its info.
        fn playing_app(&mut self, id: u32, sink: u32) -> Vec<Action> {
            self.node(id, "Stream/Output/Audio", "firefox", &(id + 1000).to_string());
            assert_eq!(self.link(id + 1, id, sink), []);
            self.info(id, "Firefox")
        }
    }

    fn app_info(name: &str) -> AppInfo {
        AppInfo { name: name.into(), role: "Music".into(), ..AppInfo::default() }
    }

    fn open(app: u32, serial: &str, name: &str, manual: bool) -> Action {
        Action::OpenTap { app, serial: serial.into(), info: app_info(name), manual }
    }

    #[test]
    fn an_app_linked_to_the_redirect_sink_is_tapped_once_its_info_is_known() {
        let mut g = Graph::new();
        assert_eq!(g.node(20, "Stream/Output/Audio", "firefox", "120"), (NodeRole::Candidate, vec![]));
        assert_eq!(g.link(21, 20, SINK), [], "no tap before the app's info");
        assert!(!g.p.is_tapped(20));
        assert_eq!(g.info(20, "Firefox"), [open(20, "120", "Firefox", false)]);
        assert!(g.p.is_tapped(20));
        // Later infos change nothing, and nothing opens twice.
        assert_eq!(g.info(20, "Firefox 2"), []);
        assert_eq!(g.tick(1000), []);
        assert_eq!(g.link(22, 20, SINK), []);
    }

    #[test]
    fn an_app_whose_info_came_first_is_tapped_when_it_links_to_either_sink() {
        let mut g = Graph::new();
        g.node(20, "Stream/Output/Audio", "mpv", "120");
        assert_eq!(g.info(20, "mpv"), [], "an app linked to nothing is not tapped");
        assert_eq!(g.link(21, 20, STANDBY), [open(20, "120", "mpv", false)]);
    }

    #[test]
    fn an_app_linked_only_to_another_sink_is_not_tapped() {
        let mut g = Graph::new();
        g.node(20, "Stream/Output/Audio", "mpv", "120");
        g.info(20, "mpv");
        assert_eq!(g.link(21, 20, CARD), []);
        assert_eq!(g.tick(1000), []);
    }

    #[test]
    fn a_node_of_ours_is_never_tapped() {
        let mut g = Graph::new();
        // Our microphone looped into our sink (recording, but no app), one of our sinks
        // into the other.
        assert_eq!(g.link(30, MIC, SINK), [Action::WantMic(true)]);
        assert_eq!(g.link(31, SINK, STANDBY), []);
        assert_eq!(g.link(32, STANDBY, SINK), []);
        // A tap's node, even one linked into our sink (say by a confused user).
        assert_eq!(g.playing_app(20, SINK), [open(20, "1020", "Firefox", false)]);
        assert_eq!(g.node(40, "Stream/Input/Audio", "melange.tap.1020", "1040"), (NodeRole::Tap, vec![]));
        assert_eq!(g.info(40, "Melange"), []);
        assert_eq!(g.link(41, 40, SINK), []);
        assert!(!g.p.is_tapped(MIC) && !g.p.is_tapped(SINK) && !g.p.is_tapped(STANDBY) && !g.p.is_tapped(40));
    }

    #[test]
    fn an_app_moved_to_another_sink_is_closed_at_once() {
        let mut g = Graph::new();
        g.playing_app(20, SINK);
        // WirePlumber unlinks first, then links to the new sink.
        assert_eq!(g.remove_at(100, 21), []);
        assert_eq!(g.link_at(110, 22, 20, CARD), [Action::CloseTap { app: 20 }]);
        assert!(!g.p.is_tapped(20));
        assert_eq!(g.tick(1000), [], "not opened again on the other sink");
    }

    #[test]
    fn an_app_linked_to_another_sink_before_it_leaves_ours_closes_when_it_leaves() {
        let mut g = Graph::new();
        g.playing_app(20, SINK);
        assert_eq!(g.link_at(100, 22, 20, CARD), [], "still linked to our sink too");
        assert_eq!(g.remove_at(110, 21), [Action::CloseTap { app: 20 }]);
    }

    #[test]
    fn an_app_unlinked_from_everything_keeps_its_tap_for_the_move_grace() {
        let mut g = Graph::new();
        g.playing_app(20, SINK);
        assert_eq!(g.remove_at(1000, 21), []);
        assert_eq!(g.tick(1250), []);
        assert_eq!(g.tick(1299), []);
        assert!(g.p.is_tapped(20));
        assert_eq!(g.tick(1300), [Action::CloseTap { app: 20 }]);
        assert_eq!(g.tick(2000), []);
        // Linked again, it gets a new tap.
        assert_eq!(g.link_at(2100, 22, 20, SINK), [open(20, "1020", "Firefox", false)]);
    }

    #[test]
    fn an_app_moved_between_our_sinks_keeps_its_tap() {
        let mut g = Graph::new();
        g.playing_app(20, SINK);
        assert_eq!(g.remove_at(1000, 21), []);
        assert_eq!(g.tick(1250), []);
        assert_eq!(g.link_at(1290, 22, 20, STANDBY), []);
        assert_eq!(g.tick(5000), []);
        assert!(g.p.is_tapped(20));
        // Its grace starts again at the next unlink, not the last.
        assert_eq!(g.remove_at(6000, 22), []);
        assert_eq!(g.tick(6299), []);
        assert_eq!(g.tick(6300), [Action::CloseTap { app: 20 }]);
    }

    #[test]
    fn a_removed_app_is_closed_at_once() {
        let mut g = Graph::new();
        g.playing_app(20, SINK);
        assert_eq!(g.remove_at(100, 20), [Action::CloseTap { app: 20 }]);
        assert_eq!(g.remove_at(101, 21), [], "its link goes after it");
        assert_eq!(g.tick(1000), []);
        assert_eq!(g.info(20, "Firefox"), [], "a removed node's late info is ignored");
    }

    #[test]
    fn an_app_on_a_removed_sink_closes_after_the_grace() {
        let mut g = Graph::new();
        g.playing_app(20, SINK);
        assert_eq!(g.remove_at(100, SINK), []);
        assert_eq!(g.p.redirect_sink(), None);
        assert_eq!(g.p.own_node(SINK), None);
        assert_eq!(g.tick(399), []);
        assert_eq!(g.tick(400), [Action::CloseTap { app: 20 }]);
        // A sink of that name again: apps linked to it are tapped.
        assert_eq!(g.node(50, "Audio/Sink", "melange", "50").0, NodeRole::Own(OwnNode::RedirectSink));
        assert_eq!(g.p.redirect_sink(), Some(50));
        assert_eq!(g.link_at(500, 22, 20, 50), [open(20, "1020", "Firefox", false)]);
    }

    #[test]
    fn a_tap_that_failed_to_open_is_opened_again_at_the_next_look() {
        let mut g = Graph::new();
        assert_eq!(g.playing_app(20, SINK), [open(20, "1020", "Firefox", false)]);
        g.p.tap_failed(20);
        assert!(!g.p.is_tapped(20));
        assert_eq!(g.tick(250), [open(20, "1020", "Firefox", false)]);
    }

    #[test]
    fn the_microphone_is_wanted_while_a_link_leaves_it() {
        let mut g = Graph::new();
        g.node(60, "Stream/Input/Audio", "arecord", "160");
        assert_eq!(g.link(61, 60, SINK), [], "a link into our sink is no recording");
        assert_eq!(g.link(62, CARD, 60), [], "a link out of another node is no recording");
        assert!(!g.p.mic_wanted());
        assert_eq!(g.link(63, MIC, 60), [Action::WantMic(true)]);
        assert_eq!(g.link(64, MIC, 60), [], "said once");
        assert_eq!(g.remove(63), []);
        assert_eq!(g.remove(64), [Action::WantMic(false)]);
        assert_eq!(g.link(65, MIC, 60), [Action::WantMic(true)]);
        assert_eq!(g.remove(MIC), [Action::WantMic(false)], "a microphone that went is not recorded from");
        assert!(!g.p.mic_wanted());
    }

    #[test]
    fn a_node_is_ours_by_its_class_and_name_both() {
        let mut g = Graph::new();
        // A sink named like our microphone, a source named like our sink: apps.
        assert_eq!(g.node(70, "Audio/Sink", "melange.mic", "170").0, NodeRole::Candidate);
        assert_eq!(g.node(71, "Audio/Source", "melange", "171").0, NodeRole::Candidate);
        assert_eq!(g.p.own_node(70), None);
        assert_eq!(g.p.own_node(MIC), Some(OwnNode::Microphone));
    }

    /// A JACK client at node 50 (no media.class, serial 150) with output ports FL (51)
    /// and FR (52), linked port by port into the redirect sink (links 53, 54), its tap's
    /// node 56 with input ports FL (57) and FR (58).
    fn jack_app(g: &mut Graph) {
        assert_eq!(g.node(50, "", "jack-player", "150"), (NodeRole::Candidate, vec![]));
        g.port(51, 50, true, "FL");
        g.port(52, 50, true, "FR");
        g.port_link(53, (50, 51), (SINK, SINK_FL));
        g.port_link(54, (50, 52), (SINK, SINK_FR));
        assert_eq!(g.info(50, "jack-player"), [open(50, "150", "jack-player", true)]);
        assert_eq!(g.node(56, "", "melange.tap.150", "156"), (NodeRole::Tap, vec![]), "no ports yet");
        assert_eq!(g.port(57, 56, false, "FL"), [Action::Link { app: 50, out_port: 51, tap_node: 56, tap_port: 57 }]);
        assert_eq!(g.port(58, 56, false, "FR"), [Action::Link { app: 50, out_port: 52, tap_node: 56, tap_port: 58 }]);
    }

    #[test]
    fn an_app_without_class_gets_the_links_to_its_tap_from_the_module_per_channel() {
        let mut g = Graph::new();
        jack_app(&mut g);
        // The registry shows them; asked nothing more.
        assert_eq!(g.port_link(60, (50, 51), (56, 57)), []);
        assert_eq!(g.port_link(61, (50, 52), (56, 58)), []);
        assert_eq!(g.tick(1000), []);
        // Not shown yet is not destroyed: nothing made twice.
        let mut g = Graph::new();
        jack_app(&mut g);
        assert_eq!(g.tick(1000), []);
        assert_eq!(g.tick(2000), []);
    }

    #[test]
    fn a_twin_goes_when_its_original_goes_and_comes_back_with_it() {
        let mut g = Graph::new();
        jack_app(&mut g);
        g.port_link(60, (50, 51), (56, 57));
        g.port_link(61, (50, 52), (56, 58));
        assert_eq!(g.remove(53), [Action::Unlink { app: 50, out_port: 51, tap_port: 57 }]);
        assert_eq!(g.remove(60), [], "the twin's own removal asks nothing");
        assert!(g.p.is_tapped(50), "still linked by FR");
        assert_eq!(
            g.port_link(62, (50, 51), (SINK, SINK_FL)),
            [Action::Link { app: 50, out_port: 51, tap_node: 56, tap_port: 57 }]
        );
    }

    #[test]
    fn a_twin_destroyed_by_someone_else_after_it_was_seen_is_made_again() {
        let mut g = Graph::new();
        jack_app(&mut g);
        g.port_link(60, (50, 51), (56, 57));
        assert_eq!(
            g.remove(60),
            [
                Action::Unlink { app: 50, out_port: 51, tap_port: 57 },
                Action::Link { app: 50, out_port: 51, tap_node: 56, tap_port: 57 },
            ]
        );
        // Until it is seen again, its absence is no destruction.
        assert_eq!(g.tick(1000), []);
        g.port_link(63, (50, 51), (56, 57));
        assert_eq!(g.remove(63).len(), 2, "destroyed again, made again");
    }

    #[test]
    fn a_twin_that_could_not_be_made_is_made_at_the_next_look() {
        let mut g = Graph::new();
        jack_app(&mut g);
        g.p.link_failed(50, 51, 57);
        assert_eq!(g.tick(250), [Action::Link { app: 50, out_port: 51, tap_node: 56, tap_port: 57 }]);
        assert_eq!(g.tick(500), []);
    }

    #[test]
    fn a_twin_goes_when_the_sink_port_it_mirrors_goes() {
        let mut g = Graph::new();
        jack_app(&mut g);
        assert_eq!(g.remove(SINK_FR), [Action::Unlink { app: 50, out_port: 52, tap_port: 58 }]);
        assert_eq!(g.remove(58), [], "nothing to mirror onto either");
        assert_eq!(g.port(59, 56, false, "FR"), [], "nor with a new tap port while the sink's is gone");
    }

    #[test]
    fn a_jack_app_on_the_standby_links_by_its_channels_and_its_tap_closes_with_its_links() {
        let mut g = Graph::new();
        g.node(50, "", "jack-player", "150");
        g.port(51, 50, true, "FL");
        // A tap port of another channel is no match.
        g.port_link(53, (50, 51), (STANDBY, STANDBY_FL));
        assert_eq!(g.info(50, "jack-player"), [open(50, "150", "jack-player", true)]);
        g.node(56, "", "melange.tap.150", "156");
        assert_eq!(g.port(58, 56, false, "FR"), []);
        assert_eq!(g.port(57, 56, false, "FL"), [Action::Link { app: 50, out_port: 51, tap_node: 56, tap_port: 57 }]);
        // The app moves to the sound card: its tap closes (the adapter drops the links).
        g.remove_at(100, 53);
        assert_eq!(g.port_link(55, (50, 51), (CARD, 99)), [Action::CloseTap { app: 50 }]);
    }

    #[test]
    fn a_jack_app_linked_by_node_only_waits_for_port_links() {
        let mut g = Graph::new();
        g.node(50, "", "jack-player", "150");
        g.port(51, 50, true, "FL");
        g.link(53, 50, SINK);
        assert_eq!(g.info(50, "jack-player"), [open(50, "150", "jack-player", true)]);
        g.node(56, "", "melange.tap.150", "156");
        assert_eq!(g.port(57, 56, false, "FL"), [], "a link without ports says no channel");
    }

    #[test]
    fn removing_ports_and_links_forgets_them() {
        let mut g = Graph::new();
        g.playing_app(20, SINK);
        g.port(25, 20, true, "FL");
        assert_eq!(g.remove(25), []);
        assert_eq!(g.remove(999), [], "an unknown id");
        assert_eq!(g.remove_at(100, 21), []);
        assert_eq!(g.tick(400), [Action::CloseTap { app: 20 }]);
    }
}
