//! Sources, destinations and routes made through the management API.
//!
//! Like Envoy's static and dynamic resources: objects written in the config file are
//! *file* objects, read-only through the API (change the file, then reload); objects
//! created through the API are *api* objects, kept in the store so that they survive a
//! restart, and changed or deleted only through the API. The config in force is the file's
//! objects followed by the api objects, validated together, so a route made through the API
//! may use a source from the file and the other way round. A name belongs to one origin: the
//! API refuses to create a name the file has, and a reload whose file adds a name that an
//! api object has is rejected (the previous config keeps serving).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{Config, DestinationConfig, RouteConfig, SourceConfig};
use crate::store::{ManagedChanges, ManagedObject};

/// The three kinds of managed object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Source,
    Destination,
    Route,
}

impl Kind {
    /// The name stored in the store's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Source => "source",
            Kind::Destination => "destination",
            Kind::Route => "route",
        }
    }

    /// From the store's `kind` column.
    fn parse(kind: &str) -> Option<Self> {
        [Kind::Source, Kind::Destination, Kind::Route]
            .into_iter()
            .find(|k| k.as_str() == kind)
    }

    /// The config file's key for a list of them.
    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Source => "sources",
            Kind::Destination => "destinations",
            Kind::Route => "routes",
        }
    }
}

/// Where an object is defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The config file: read-only through the API.
    File,
    /// The management API: stored, and changed through the API.
    Api,
}

/// A source, destination or route, as the API takes it.
#[derive(Clone, Debug)]
pub enum Object {
    Source(SourceConfig),
    Destination(DestinationConfig),
    Route(RouteConfig),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Source(_) => Kind::Source,
            Object::Destination(_) => Kind::Destination,
            Object::Route(_) => Kind::Route,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Object::Source(s) => &s.name,
            Object::Destination(d) => &d.name,
            Object::Route(r) => &r.name,
        }
    }

    fn stored(&self) -> ManagedObject {
        let body = match self {
            Object::Source(s) => serde_json::to_string(s),
            Object::Destination(d) => serde_json::to_string(d),
            Object::Route(r) => serde_json::to_string(r),
        }
        .expect("config objects serialize");
        ManagedObject {
            kind: self.kind().as_str().into(),
            name: self.name().into(),
            body,
        }
    }

    fn parse(stored: &ManagedObject) -> Result<Object, String> {
        let e = |e: serde_json::Error| e.to_string();
        Ok(match stored.kind.as_str() {
            "source" => Object::Source(serde_json::from_str(&stored.body).map_err(e)?),
            "destination" => Object::Destination(serde_json::from_str(&stored.body).map_err(e)?),
            "route" => Object::Route(serde_json::from_str(&stored.body).map_err(e)?),
            other => return Err(format!("unknown kind `{other}`")),
        })
    }
}

/// A change made through the API.
#[derive(Clone, Debug)]
pub enum Change {
    /// A new object; its name must be free.
    Create(Object),
    /// A new version of an api object.
    Update(Object),
    Delete(Kind, String),
}

impl Change {
    pub fn kind(&self) -> Kind {
        match self {
            Change::Create(o) | Change::Update(o) => o.kind(),
            Change::Delete(k, _) => *k,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Change::Create(o) | Change::Update(o) => o.name(),
            Change::Delete(_, n) => n,
        }
    }

    /// What the store must do to persist this change.
    pub fn stored(&self) -> Result<ManagedObject, (Kind, String)> {
        match self {
            Change::Create(o) | Change::Update(o) => Ok(o.stored()),
            Change::Delete(k, n) => Err((*k, n.clone())),
        }
    }
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The object itself is invalid: `field` is the key inside it (`verify.secret`).
    #[error("`{field}`: {message}")]
    Invalid { field: String, message: String },
    /// The change is fine in itself but clashes with what exists.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The api objects, by name.
#[derive(Clone, Debug, Default)]
pub struct Managed {
    pub sources: BTreeMap<String, Arc<SourceConfig>>,
    pub destinations: BTreeMap<String, Arc<DestinationConfig>>,
    pub routes: BTreeMap<String, Arc<RouteConfig>>,
    /// Each object's JSON as stored: what [`Managed::following`] compares the store with.
    stored: Stored,
}

/// The kinds and names of the objects a change touched.
pub type Changed = Vec<(Kind, String)>;

/// The stored JSON of each kind's objects, by name (persistent maps: a clone per change
/// costs nothing, whatever their number).
#[derive(Clone, Debug, Default)]
struct Stored([imbl::HashMap<String, String>; 3]);

impl Stored {
    fn of(&mut self, kind: Kind) -> &mut imbl::HashMap<String, String> {
        &mut self.0[kind as usize]
    }

    fn get(&self, kind: Kind, name: &str) -> Option<&String> {
        self.0[kind as usize].get(name)
    }
}

impl Managed {
    /// The objects from the store. A stored object that no longer parses is logged and
    /// left out (it stays in the store).
    pub fn from_stored(objects: &[ManagedObject]) -> Self {
        let mut m = Managed::default();
        for stored in objects {
            match Object::parse(stored) {
                Ok(o) if o.name() == stored.name => m.insert(o, stored.body.clone()),
                Ok(_) => tracing::error!(kind = %stored.kind, name = %stored.name,
                    "A stored object's name does not match its key; left out."),
                Err(e) => tracing::error!(kind = %stored.kind, name = %stored.name, error = %e,
                    "A stored object does not parse; left out."),
            }
        }
        m
    }

    fn insert(&mut self, o: Object, body: String) {
        self.stored.of(o.kind()).insert(o.name().to_string(), body);
        match o {
            Object::Source(s) => {
                self.sources.insert(s.name.clone(), Arc::new(s));
            }
            Object::Destination(d) => {
                self.destinations.insert(d.name.clone(), Arc::new(d));
            }
            Object::Route(r) => {
                self.routes.insert(r.name.clone(), Arc::new(r));
            }
        }
    }

    fn remove(&mut self, kind: Kind, name: &str) -> bool {
        self.stored.of(kind).remove(name);
        match kind {
            Kind::Source => self.sources.remove(name).is_some(),
            Kind::Destination => self.destinations.remove(name).is_some(),
            Kind::Route => self.routes.remove(name).is_some(),
        }
    }

    pub fn contains(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Source => self.sources.contains_key(name),
            Kind::Destination => self.destinations.contains_key(name),
            Kind::Route => self.routes.contains_key(name),
        }
    }

    pub fn origin(&self, kind: Kind, name: &str) -> Origin {
        if self.contains(kind, name) {
            Origin::Api
        } else {
            Origin::File
        }
    }

    /// The config in force: the file's objects followed by these, validated together —
    /// all of them, or, after a change to a config that was valid, the `changed` object on
    /// its own and the names and references of all (see `Config::validate_objects`).
    /// The error names the key in the merged config (`routes[3].source`).
    pub fn merged_with(
        &self,
        file: &Config,
        changed: Option<(Kind, &str)>,
    ) -> Result<Config, (String, String)> {
        let mut c = file.clone();
        let clash = |kind: Kind, i: usize, name: &str| {
            (
                format!("{}[{i}].name", kind.plural()),
                format!(
                    "`{name}` is defined both in the config file and through the management API; delete one of them"
                ),
            )
        };
        for (i, s) in file.sources.iter().enumerate() {
            if self.sources.contains_key(&s.name) {
                return Err(clash(Kind::Source, i, &s.name));
            }
        }
        for (i, d) in file.destinations.iter().enumerate() {
            if self.destinations.contains_key(&d.name) {
                return Err(clash(Kind::Destination, i, &d.name));
            }
        }
        for (i, r) in file.routes.iter().enumerate() {
            if self.routes.contains_key(&r.name) {
                return Err(clash(Kind::Route, i, &r.name));
            }
        }
        c.sources.extend(self.sources.values().cloned());
        c.destinations.extend(self.destinations.values().cloned());
        c.routes.extend(self.routes.values().cloned());
        c.validate_objects(changed)?;
        Ok(c)
    }

    /// Applies `change` on top of `file`: the new managed set and the config it makes, or
    /// why the change is refused.
    pub fn apply(&self, file: &Config, change: &Change) -> Result<(Managed, Config), ChangeError> {
        let (kind, name) = (change.kind(), change.name().to_string());
        let in_file = names(file, kind).any(|n| n == name);
        let mut next = self.clone();
        match change {
            Change::Create(o) => {
                if in_file || self.contains(kind, &name) {
                    return Err(ChangeError::Conflict(format!(
                        "a {} named `{name}` already exists",
                        kind.as_str()
                    )));
                }
                next.insert(o.clone(), o.stored().body);
            }
            Change::Update(o) => {
                if in_file {
                    return Err(read_only(kind, &name));
                }
                if !next.remove(kind, &name) {
                    return Err(not_found(kind, &name));
                }
                next.insert(o.clone(), o.stored().body);
            }
            Change::Delete(..) => {
                if in_file {
                    return Err(read_only(kind, &name));
                }
                if !next.remove(kind, &name) {
                    return Err(not_found(kind, &name));
                }
            }
        }
        let config = next
            .merged_with(file, Some((kind, &name)))
            .map_err(|(key, message)| next.blame(file, change, &key, message))?;
        Ok((next, config))
    }

    /// What other instances changed on a shared store, from its log of the changes since
    /// the version this set was made of (`Store::managed_changes`): this set with the
    /// changed objects whose JSON differs from what it was made of parsed again, the
    /// deleted ones removed and the others kept as they are — the same allocations, so the
    /// routing rebuilds only what changed. The new set and the changed objects' kinds and
    /// names, `None` if nothing changed (an instance's own changes compare equal); the
    /// error names a changed object that does not parse (a full reload then logs it and
    /// leaves it out).
    pub fn following_changes(
        &self,
        changes: &ManagedChanges,
    ) -> Result<Option<(Managed, Changed)>, String> {
        let (mut next, mut changed) = (None, Vec::new());
        for stored in &changes.changed {
            self.take_in(stored, &mut next, &mut changed)?;
        }
        for (kind, name) in &changes.deleted {
            let kind = Kind::parse(kind).ok_or_else(|| format!("{kind} `{name}`"))?;
            if self.stored.get(kind, name).is_some() {
                let next = next.get_or_insert_with(|| self.clone());
                next.remove(kind, name);
                changed.push((kind, name.clone()));
            }
        }
        Ok(next.map(|next| (next, changed)))
    }

    /// Takes `stored` into `next` (this set, cloned at the first change) if its JSON is not
    /// the one this set was made of. True if this set has an object of that name.
    fn take_in(
        &self,
        stored: &ManagedObject,
        next: &mut Option<Managed>,
        changed: &mut Changed,
    ) -> Result<bool, String> {
        let unusable = || format!("{} `{}`", stored.kind, stored.name);
        let kind = Kind::parse(&stored.kind).ok_or_else(unusable)?;
        let known = match self.stored.get(kind, &stored.name) {
            Some(body) if *body == stored.body => return Ok(true),
            Some(_) => true,
            None => false,
        };
        let object = (Object::parse(stored).ok())
            .filter(|o| o.name() == stored.name)
            .ok_or_else(unusable)?;
        let next = next.get_or_insert_with(|| self.clone());
        next.remove(kind, &stored.name);
        next.insert(object, stored.body.clone());
        changed.push((kind, stored.name.clone()));
        Ok(known)
    }

    /// Turns an error of the merged config into one about the changed object (a field of
    /// it) or a conflict with another object (named).
    pub fn blame(&self, file: &Config, change: &Change, key: &str, message: String) -> ChangeError {
        let (kind, name) = (change.kind(), change.name());
        if !matches!(change, Change::Delete(..)) {
            let index = names(file, kind).count()
                + self
                    .names(kind)
                    .position(|n| n == name)
                    .expect("the changed object is in the set");
            let prefix = format!("{}[{index}]", kind.plural());
            if let Some(rest) = key.strip_prefix(&prefix) {
                return ChangeError::Invalid {
                    field: rest.trim_start_matches('.').to_string(),
                    message,
                };
            }
        }
        let culprit = [Kind::Source, Kind::Destination, Kind::Route]
            .into_iter()
            .find_map(|k| {
                let rest = key.strip_prefix(k.plural())?.strip_prefix('[')?;
                let i: usize = rest.split(']').next()?.parse().ok()?;
                let n = names(file, k).chain(self.names(k)).nth(i)?;
                Some(format!("{} `{n}`", k.as_str()))
            })
            .unwrap_or_else(|| "the config".into());
        ChangeError::Conflict(format!(
            "this change to {} `{name}` would break {culprit} (`{key}`: {message})",
            kind.as_str()
        ))
    }

    fn names(&self, kind: Kind) -> Box<dyn Iterator<Item = &str> + '_> {
        match kind {
            Kind::Source => Box::new(self.sources.keys().map(String::as_str)),
            Kind::Destination => Box::new(self.destinations.keys().map(String::as_str)),
            Kind::Route => Box::new(self.routes.keys().map(String::as_str)),
        }
    }
}

/// The names of a config's objects of one kind, in order.
pub(crate) fn names(c: &Config, kind: Kind) -> Box<dyn Iterator<Item = &str> + '_> {
    match kind {
        Kind::Source => Box::new(c.sources.iter().map(|s| s.name.as_str())),
        Kind::Destination => Box::new(c.destinations.iter().map(|d| d.name.as_str())),
        Kind::Route => Box::new(c.routes.iter().map(|r| r.name.as_str())),
    }
}

fn read_only(kind: Kind, name: &str) -> ChangeError {
    ChangeError::Conflict(format!(
        "{} `{name}` is defined in the config file and is read-only through the API; change the file and reload",
        kind.as_str()
    ))
}

fn not_found(kind: Kind, name: &str) -> ChangeError {
    ChangeError::NotFound(format!("no {} named `{name}`", kind.as_str()))
}

/// Secrets as the API shows them: never in full.
pub trait Redact: Sized {
    /// A copy with every secret shortened to `****` and its last four characters.
    fn redacted(&self) -> Self;
    /// After a PATCH: a secret sent back as it was shown is the stored one, unchanged.
    fn keep_secrets(&mut self, old: &Self);
}

/// `****` and the last four characters (or only `****` for short secrets).
pub fn redact(secret: &str) -> String {
    let n = secret.chars().count();
    if n < 16 {
        return "****".into();
    }
    let tail: String = secret.chars().skip(n - 4).collect();
    format!("****{tail}")
}

/// `headers` with the values of those whose names name a secret redacted.
pub fn redact_secret_headers(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    (headers.into_iter())
        .map(|(name, value)| match secret_name(&name) {
            true => (name, redact(&value)),
            false => (name, value),
        })
        .collect()
}

/// `text` with the values of the query parameters in it whose names name a secret
/// (`?key=…`, `&access_token=…`, and by their whole names Azure's `?code=` — a Functions
/// key — and `&sig=` — a SAS signature; `country_code` is not one) as `****`: a URL a plugin puts in an
/// error or a drop reason — a geocoder's `?key=` — is stored with the event's outcome and
/// logged, and a key in it must not be.
pub fn redact_query_secrets(text: &str) -> std::borrow::Cow<'_, str> {
    let secrets = query_secrets(text);
    if secrets.is_empty() {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (_, value) in secrets {
        out.push_str(&text[copied..value.start]);
        out.push_str("****");
        copied = value.end;
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// Where the query parameters whose names name a secret are in `text`: each one's name
/// and (non-empty) value.
fn query_secrets(text: &str) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'?' && bytes[i] != b'&' {
            i += 1;
            continue;
        }
        let name_start = i + 1;
        let name_end = (name_start..bytes.len())
            .find(|&j| {
                !(bytes[j].is_ascii_alphanumeric() || matches!(bytes[j], b'_' | b'-' | b'.' | b'%'))
            })
            .unwrap_or(bytes.len());
        if name_end == name_start || bytes.get(name_end) != Some(&b'=') {
            i = name_start;
            continue;
        }
        let value_start = name_end + 1;
        let value_end = (value_start..bytes.len())
            .find(|&j| {
                bytes[j].is_ascii_whitespace()
                    || matches!(
                        bytes[j],
                        b'&' | b'#' | b'"' | b'\'' | b'`' | b')' | b'<' | b'>' | b',' | b';'
                    )
            })
            .unwrap_or(bytes.len());
        let name = &text[name_start..name_end];
        let secret =
            secret_name(name) || ["code", "sig"].iter().any(|s| name.eq_ignore_ascii_case(s));
        if value_end > value_start && secret {
            found.push((name_start..name_end, value_start..value_end));
        }
        i = value_end;
    }
    found
}

/// Names (of destination headers, of plugin config keys) whose values are treated as
/// secrets.
pub(crate) fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "authorization",
        "cookie",
        "key",
        "token",
        "secret",
        "password",
        "signature",
    ]
    .iter()
    .any(|s| n.contains(s))
}

fn keep(new: &mut String, old: &str) {
    if *new == redact(old) {
        *new = old.to_string();
    }
}

/// A URL (or a plugin's config value) given with a secret query parameter as the API
/// showed it (`?token=****`) keeps that parameter's stored value — also when the rest of
/// the URL changed.
fn keep_query_secrets(new: &mut String, old: &str) {
    let olds = query_secrets(old);
    if olds.is_empty() || !new.contains("=****") {
        return;
    }
    let mut out = String::with_capacity(new.len());
    let mut copied = 0;
    for (name, value) in query_secrets(new) {
        let stored = (olds.iter()).find(|(n, _)| old[n.clone()] == new[name.clone()]);
        if let (Some((_, stored)), "****") = (stored, &new[value.clone()]) {
            out.push_str(&new[copied..value.start]);
            out.push_str(&old[stored.clone()]);
            copied = value.end;
        }
    }
    out.push_str(&new[copied..]);
    *new = out;
}

/// Serializes a URL as the API shows one: the values of its query's secret parameters
/// (`?token=…`, `&api_key=…`) as `****` (see [`redact_query_secrets`]).
pub fn serialize_redacted_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_query_secrets(url))
}

/// Puts back each secret of a list echoed redacted: the one at the same place if its
/// redaction matches (two short secrets redact alike), else the first that matches.
fn keep_listed<'a>(news: impl Iterator<Item = &'a mut String>, olds: &[&String]) {
    for (i, x) in news.enumerate() {
        let same_place = olds.get(i).filter(|o| *x == redact(o));
        if let Some(o) = same_place.or_else(|| olds.iter().find(|o| *x == redact(o))) {
            *x = o.to_string();
        }
    }
}

impl Redact for SourceConfig {
    fn redacted(&self) -> Self {
        use crate::edge::VerifyConfig as V;
        let mut s = self.clone();
        match &mut s.verify {
            Some(V::HmacSha256(h) | V::HmacSha1(h) | V::HmacSha512(h)) => {
                h.secret = redact(&h.secret);
                for x in h.previous_secrets.iter_mut() {
                    *x = redact(x);
                }
            }
            Some(
                V::StandardWebhooks { secrets, .. }
                | V::Header { secrets, .. }
                | V::Query { secrets, .. }
                | V::Twilio { secrets, .. },
            ) => {
                for x in secrets.iter_mut() {
                    *x = redact(x);
                }
            }
            _ => {}
        }
        if let Some(token) = s.challenge.as_mut().and_then(|c| c.token.as_mut()) {
            *token = redact(token);
        }
        s
    }

    fn keep_secrets(&mut self, old: &Self) {
        use crate::edge::VerifyConfig as V;
        let tokens = (self.challenge.as_mut().and_then(|c| c.token.as_mut()))
            .zip(old.challenge.as_ref().and_then(|c| c.token.as_ref()));
        if let Some((token, old)) = tokens {
            keep(token, old);
        }
        match (&mut self.verify, &old.verify) {
            (Some(new), Some(old)) if new.hmac().is_some() && old.hmac().is_some() => {
                let (new, (_, old)) = (new.hmac_mut().expect("hmac"), old.hmac().expect("hmac"));
                // A rotation may move the secret in force to `previous_secrets` (and a
                // change of hash keeps the secrets).
                let olds: Vec<&String> = std::iter::once(&old.secret)
                    .chain(&old.previous_secrets)
                    .collect();
                keep_listed(
                    std::iter::once(&mut new.secret).chain(&mut new.previous_secrets),
                    &olds,
                );
            }
            (
                Some(V::StandardWebhooks { secrets, .. }),
                Some(V::StandardWebhooks { secrets: olds, .. }),
            )
            | (Some(V::Header { secrets, .. }), Some(V::Header { secrets: olds, .. }))
            | (Some(V::Query { secrets, .. }), Some(V::Query { secrets: olds, .. }))
            | (Some(V::Twilio { secrets, .. }), Some(V::Twilio { secrets: olds, .. })) => {
                keep_listed(secrets.iter_mut(), &olds.iter().collect::<Vec<_>>())
            }
            _ => {}
        }
    }
}

impl Redact for DestinationConfig {
    fn redacted(&self) -> Self {
        let mut d = self.clone();
        d.url = redact_query_secrets(&d.url).into_owned();
        if let Some(s) = &mut d.signing {
            s.secret = redact(&s.secret);
            for previous in &mut s.previous_secrets {
                *previous = redact(previous);
            }
        }
        for (name, value) in d.headers.iter_mut() {
            if secret_name(name) {
                *value = redact(value);
            }
        }
        if let Some(o) = &mut d.oauth2 {
            o.client_secret = redact(&o.client_secret);
            for (name, value) in o.params.iter_mut() {
                if secret_name(name) {
                    *value = redact(value);
                }
            }
        }
        d
    }

    fn keep_secrets(&mut self, old: &Self) {
        keep_query_secrets(&mut self.url, &old.url);
        if let (Some(s), Some(o)) = (&mut self.signing, &old.signing) {
            // A rotation through the API echoes the old secret, shown redacted, as a
            // previous one.
            let olds: Vec<&String> = o.secrets().collect();
            keep_listed(
                std::iter::once(&mut s.secret).chain(&mut s.previous_secrets),
                &olds,
            );
        }
        for (name, value) in self.headers.iter_mut() {
            if let Some(o) = old.headers.get(name) {
                keep(value, o);
            }
        }
        if let (Some(o), Some(old)) = (&mut self.oauth2, &old.oauth2) {
            keep(&mut o.client_secret, &old.client_secret);
            for (name, value) in o.params.iter_mut() {
                if let Some(old) = old.params.get(name) {
                    keep(value, old);
                }
            }
        }
    }
}

impl Redact for RouteConfig {
    /// A plugin's config may hold what it signs or authenticates with: values whose keys
    /// name a secret are redacted, as destination headers are, and the secret query
    /// parameters of the others (a service's `url = "…?api_key=…"`), as URLs are.
    fn redacted(&self) -> Self {
        let mut r = self.clone();
        for plugin in &mut r.plugins {
            for (key, value) in &mut plugin.config {
                if secret_name(key) {
                    *value = redact(value);
                } else if let std::borrow::Cow::Owned(shown) = redact_query_secrets(value) {
                    *value = shown;
                }
            }
        }
        r
    }

    /// The old value of a key is that of the plugin at the same place in the chain, or
    /// else of the first plugin of the same name.
    fn keep_secrets(&mut self, old: &Self) {
        for (i, plugin) in self.plugins.iter_mut().enumerate() {
            let Some(o) = old
                .plugins
                .get(i)
                .filter(|o| o.name == plugin.name)
                .or_else(|| old.plugins.iter().find(|o| o.name == plugin.name))
            else {
                continue;
            };
            for (key, value) in &mut plugin.config {
                if let Some((_, old_value)) = o.config.iter().find(|(k, _)| k == key) {
                    match secret_name(key) {
                        true => keep(value, old_value),
                        false => keep_query_secrets(value, old_value),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_secrets_are_redacted_in_text_and_nothing_else() {
        use super::redact_query_secrets as r;
        assert_eq!(
            r("GET https://maps.example.com/geo?lat=1&key=AIzaSy123&api_token=t0k answered 403"),
            "GET https://maps.example.com/geo?lat=1&key=****&api_token=**** answered 403"
        );
        assert_eq!(
            r("`GET https://x.example/?Signature=abc#frag` and (https://y.example/?secret=s)"),
            "`GET https://x.example/?Signature=****#frag` and (https://y.example/?secret=****)"
        );
        assert_eq!(
            r(
                "https://fn.azurewebsites.net/api/in?code=abc== and https://b.blob.core.windows.net/c?sv=2022&sig=x%2By"
            ),
            "https://fn.azurewebsites.net/api/in?code=**** and https://b.blob.core.windows.net/c?sv=2022&sig=****"
        );
        for kept in [
            "GET https://crm.example.com/sims/1?iccid=8945&page=2 answered 404",
            "https://geo.example/v1?country_code=DK&signal=3",
            "a ? b & c",
            "?key= (empty)",
            "no query at all",
        ] {
            assert!(matches!(r(kept), std::borrow::Cow::Borrowed(_)), "{kept}");
        }
    }

    use super::*;
    use std::path::Path;

    fn file() -> Config {
        Config::parse(
            r#"
            [[sources]]
            name = "onomondo"
            [[destinations]]
            name = "fleet"
            url = "https://fleet.example/in"
            [[routes]]
            source = "onomondo"
            destinations = ["fleet"]
            "#,
            "test.toml",
            Path::new("."),
            &|_| None,
        )
        .unwrap()
    }

    fn destination(name: &str, url: &str) -> Object {
        Object::Destination(
            serde_json::from_value(serde_json::json!({ "name": name, "url": url })).unwrap(),
        )
    }

    #[test]
    fn following_the_store_parses_only_what_changed() {
        let object = |kind: &str, body: serde_json::Value| ManagedObject {
            kind: kind.into(),
            name: body["name"].as_str().unwrap().into(),
            body: body.to_string(),
        };
        let source = object("source", serde_json::json!({ "name": "bondio" }));
        let archive = |url: &str| {
            object(
                "destination",
                serde_json::json!({ "name": "archive", "url": url }),
            )
        };
        let route = object(
            "route",
            serde_json::json!({ "name": "r", "source": "bondio", "destinations": ["archive"] }),
        );
        let before = Managed::from_stored(&[
            source.clone(),
            archive("https://a.example/in"),
            route.clone(),
        ]);

        let changes = |changed: &[ManagedObject], deleted: &[(&str, &str)]| ManagedChanges {
            version: 1,
            changed: changed.to_vec(),
            deleted: (deleted.iter())
                .map(|(k, n)| (k.to_string(), n.to_string()))
                .collect(),
        };
        // Nothing changed (an instance's own changes, say): nothing to take in; nor does
        // the deletion of an object it never had.
        let same = changes(&[archive("https://a.example/in")], &[("route", "gone")]);
        assert!(before.following_changes(&same).unwrap().is_none());

        // The destination changed, the route deleted, a source made.
        let made = object("source", serde_json::json!({ "name": "onomondo-2" }));
        let now = changes(
            &[archive("https://b.example/in"), made.clone()],
            &[("route", "r")],
        );
        let (after, mut changed) = before.following_changes(&now).unwrap().unwrap();
        changed.sort_by_key(|(kind, name)| (kind.as_str(), name.clone()));
        assert_eq!(
            changed,
            [
                (Kind::Destination, "archive".to_string()),
                (Kind::Route, "r".to_string()),
                (Kind::Source, "onomondo-2".to_string()),
            ]
        );
        assert!(Arc::ptr_eq(
            &after.sources["bondio"],
            &before.sources["bondio"]
        ));
        assert_eq!(after.destinations["archive"].url, "https://b.example/in");
        assert!(after.routes.is_empty());
        assert_eq!(after.sources.len(), 2);
        // What it was made of is what the next comparison starts from.
        assert!(after.following_changes(&now).unwrap().is_none());
        // The same set made by API changes compares equal to the store too.
        let (by_api, _) =
            (before.apply(&file(), &Change::Delete(Kind::Route, "r".into()))).unwrap();
        let (by_api, _) = by_api
            .apply(
                &file(),
                &Change::Update(destination("archive", "https://b.example/in")),
            )
            .unwrap();
        let (by_api, _) = by_api
            .apply(&file(), &Change::Create(Object::parse(&made).unwrap()))
            .unwrap();
        assert!(by_api.following_changes(&now).unwrap().is_none());

        // A changed object that does not parse: not taken in (a full reload logs it).
        let broken = object(
            "destination",
            serde_json::json!({ "name": "archive", "url": 7 }),
        );
        assert_eq!(
            (before.following_changes(&changes(&[source, broken], &[]))).unwrap_err(),
            "destination `archive`"
        );
    }

    #[test]
    fn file_routes_are_named_after_their_source() {
        assert_eq!(file().routes[0].name, "onomondo");
    }

    #[test]
    fn create_update_delete() {
        let (file, m) = (file(), Managed::default());
        let (m, c) = m
            .apply(
                &file,
                &Change::Create(destination("archive", "https://a.example/")),
            )
            .unwrap();
        assert_eq!(c.destinations.len(), 2);
        let err = m
            .apply(
                &file,
                &Change::Create(destination("archive", "https://b.example/")),
            )
            .unwrap_err();
        assert!(matches!(err, ChangeError::Conflict(_)), "{err}");
        let (m, c) = m
            .apply(
                &file,
                &Change::Update(destination("archive", "https://b.example/")),
            )
            .unwrap();
        assert_eq!(c.destinations[1].url, "https://b.example/");
        let (m, c) = m
            .apply(&file, &Change::Delete(Kind::Destination, "archive".into()))
            .unwrap();
        assert_eq!(c.destinations.len(), 1);
        assert!(m.destinations.is_empty());
    }

    #[test]
    fn invalid_field_is_named_relative_to_the_object() {
        let err = Managed::default()
            .apply(&file(), &Change::Create(destination("archive", "ftp://x")))
            .unwrap_err();
        match err {
            ChangeError::Invalid { field, .. } => assert_eq!(field, "url"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn file_objects_are_read_only_and_used_ones_cannot_go() {
        let file = file();
        let err = Managed::default()
            .apply(&file, &Change::Delete(Kind::Destination, "fleet".into()))
            .unwrap_err();
        assert!(err.to_string().contains("config file"), "{err}");

        let m = Managed::default();
        let (m, _) = m
            .apply(
                &file,
                &Change::Create(destination("archive", "https://a.example/")),
            )
            .unwrap();
        let route: RouteConfig = serde_json::from_value(serde_json::json!({
            "name": "to-archive", "source": "onomondo", "destinations": ["archive"]
        }))
        .unwrap();
        let (m, _) = m
            .apply(&file, &Change::Create(Object::Route(route)))
            .unwrap();
        let err = m
            .apply(&file, &Change::Delete(Kind::Destination, "archive".into()))
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ChangeError::Conflict(_)), "{text}");
        assert!(text.contains("route `to-archive`"), "{text}");
    }

    #[test]
    fn a_file_name_that_clashes_with_an_api_object_is_rejected() {
        let mut m = Managed::default();
        let o = destination("fleet", "https://other.example/");
        m.insert(o.clone(), o.stored().body);
        let (key, message) = m.merged_with(&file(), None).unwrap_err();
        assert_eq!(key, "destinations[0].name");
        assert!(message.contains("both"), "{message}");
    }

    #[test]
    fn a_sources_header_secrets_are_redacted_and_kept_when_echoed() {
        let s: SourceConfig = serde_json::from_value(serde_json::json!({
            "name": "1nce",
            "verify": { "scheme": "header", "header": "x-api-key",
                        "secrets": ["k-new-0123456789abcdef", "k-old-0123456789abcdeF"] }
        }))
        .unwrap();
        let shown = serde_json::to_value(s.redacted()).unwrap();
        assert_eq!(
            shown["verify"]["secrets"],
            serde_json::json!(["****cdef", "****cdeF"])
        );
        assert_eq!(shown["verify"]["header"], "x-api-key");
        // A rotation through the API: a new secret, the old one echoed as shown.
        let mut patched: SourceConfig = serde_json::from_value(serde_json::json!({
            "name": "1nce",
            "verify": { "scheme": "header", "header": "x-api-key",
                        "secrets": ["k-newer-0123456789abcd", "****cdef"] }
        }))
        .unwrap();
        patched.keep_secrets(&s);
        let kept = serde_json::to_value(&patched).unwrap();
        assert_eq!(
            kept["verify"]["secrets"],
            serde_json::json!(["k-newer-0123456789abcd", "k-new-0123456789abcdef"])
        );
    }

    #[test]
    fn a_sources_hmac_secrets_are_redacted_and_kept_through_a_rotation() {
        let s: SourceConfig = serde_json::from_value(serde_json::json!({
            "name": "bondio",
            "verify": { "scheme": "hmac-sha256", "header": "bondio-signature",
                        "secret": "b-old-0123456789abcdef" }
        }))
        .unwrap();
        let shown = serde_json::to_value(s.redacted()).unwrap();
        assert_eq!(shown["verify"]["secret"], "****cdef");
        // The new secret in force, the old one echoed as shown kept as a previous one.
        let mut patched: SourceConfig = serde_json::from_value(serde_json::json!({
            "name": "bondio",
            "verify": { "scheme": "hmac-sha256", "header": "bondio-signature",
                        "secret": "b-new-0123456789abcdeF", "previous_secrets": ["****cdef"] }
        }))
        .unwrap();
        patched.keep_secrets(&s);
        let shown = serde_json::to_value(patched.redacted()).unwrap();
        assert_eq!(
            shown["verify"]["previous_secrets"],
            serde_json::json!(["****cdef"])
        );
        let kept = serde_json::to_value(&patched).unwrap();
        assert_eq!(kept["verify"]["secret"], "b-new-0123456789abcdeF");
        assert_eq!(
            kept["verify"]["previous_secrets"],
            serde_json::json!(["b-old-0123456789abcdef"])
        );
        // Echoed whole, both stay.
        let mut echoed: SourceConfig =
            serde_json::from_value(serde_json::to_value(patched.redacted()).unwrap()).unwrap();
        echoed.keep_secrets(&patched);
        assert_eq!(
            serde_json::to_value(&echoed).unwrap(),
            serde_json::to_value(&patched).unwrap()
        );
    }

    #[test]
    fn secrets_are_redacted_and_kept_when_echoed() {
        let d: DestinationConfig = serde_json::from_value(serde_json::json!({
            "name": "d", "url": "https://d.example/",
            "headers": { "x-api-key": "k-0123456789abcdef", "x-region": "eu" },
            "signing": { "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" },
            "oauth2": {
                "token_url": "https://auth.example/token", "client_id": "gw",
                "client_secret": "cs-0123456789abcdef",
                "params": { "audience": "https://d.example/", "assertion_key": "ak-0123456789abcdef" }
            }
        }))
        .unwrap();
        let shown = d.redacted();
        assert_eq!(shown.url, "https://d.example/");
        assert_eq!(shown.headers["x-api-key"], "****cdef");
        assert_eq!(shown.headers["x-region"], "eu");
        assert_eq!(shown.signing.as_ref().unwrap().secret, "****LaSw");
        let oauth2 = shown.oauth2.as_ref().unwrap();
        assert_eq!(oauth2.client_secret, "****cdef");
        assert_eq!(oauth2.params["audience"], "https://d.example/");
        assert_eq!(oauth2.params["assertion_key"], "****cdef");
        assert_eq!(oauth2.client_id, "gw");
        let mut echoed = shown.clone();
        echoed.keep_secrets(&d);
        assert_eq!(echoed.headers["x-api-key"], "k-0123456789abcdef");
        assert_eq!(echoed.signing.unwrap().secret, d.signing.unwrap().secret);
        let (echoed, d) = (echoed.oauth2.unwrap(), d.oauth2.unwrap());
        assert_eq!(echoed.client_secret, d.client_secret);
        assert_eq!(echoed.params, d.params);

        // A secret in the URL's query (a function's `?code=`, a hook's `?token=`): shown
        // as `****`, kept when echoed, replaced when changed.
        let d: DestinationConfig = serde_json::from_value(serde_json::json!({
            "name": "d", "url": "https://d.example/hook?region=eu&token=t-0123456789"
        }))
        .unwrap();
        let shown = d.redacted();
        assert_eq!(shown.url, "https://d.example/hook?region=eu&token=****");
        let mut echoed = shown.clone();
        echoed.keep_secrets(&d);
        assert_eq!(echoed.url, d.url);
        let mut changed = shown;
        changed.url = "https://d.example/v2/hook?token=****&region=us".into();
        changed.keep_secrets(&d);
        assert_eq!(
            changed.url,
            "https://d.example/v2/hook?token=t-0123456789&region=us"
        );
        changed.url = "https://d.example/hook?token=t-new".into();
        changed.keep_secrets(&d);
        assert_eq!(changed.url, "https://d.example/hook?token=t-new");
        changed.url = "https://d.example/hook?api_key=****".into();
        changed.keep_secrets(&d);
        assert_eq!(
            changed.url, "https://d.example/hook?api_key=****",
            "no such one stored"
        );
    }

    #[test]
    fn plugin_config_secrets_are_redacted_and_kept_when_echoed() {
        let r: RouteConfig = serde_json::from_value(serde_json::json!({
            "name": "r", "source": "s",
            "plugins": [
                { "name": "sign", "config": { "signing-key": "k-0123456789abcdef", "mode": "v1" } },
                { "name": "tag-router", "config": { "default": "archive" } },
                { "name": "enrich", "config": { "url": "https://geo.example/v1?key=AIza123&lang=en" } }
            ]
        }))
        .unwrap();
        let shown = r.redacted();
        let config = &shown.plugins[0].config;
        assert_eq!(config[0], ("signing-key".into(), "****cdef".into()));
        assert_eq!(
            shown.plugins[2].config[0].1,
            "https://geo.example/v1?key=****&lang=en"
        );
        assert_eq!(config[1], ("mode".into(), "v1".into()));
        assert_eq!(shown.plugins[1].config, r.plugins[1].config);

        // Echoed back, also with the chain reordered: the real key is kept.
        let mut echoed = shown.clone();
        echoed.plugins.reverse();
        echoed.keep_secrets(&r);
        assert_eq!(echoed.plugins[2].config[0].1, "k-0123456789abcdef");
        assert_eq!(echoed.plugins[0].config, r.plugins[2].config);
        // A new value is taken as it is.
        let mut changed = shown;
        changed.plugins[0].config[0].1 = "k-fedcba9876543210".into();
        changed.keep_secrets(&r);
        assert_eq!(changed.plugins[0].config[0].1, "k-fedcba9876543210");
    }

    #[test]
    fn stored_objects_round_trip() {
        let o = destination("archive", "https://a.example/:source:");
        let m = Managed::from_stored(&[o.stored()]);
        assert_eq!(m.destinations["archive"].url, "https://a.example/:source:");
    }
}
