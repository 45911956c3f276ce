//! Finding and editing sealed values inside YAML manifests (multi-document files).
//!
//! GitOps users keep comments, key order and formatting in their manifests, so edits are made on the
//! text, not by re-serialising:
//! - replacing a sealed value (reseal, re-sealing an existing credential) substitutes the token text in
//!   place: tokens are single-line strings of `[A-Za-z0-9._=-]` that YAML never escapes or folds;
//! - adding a credential inserts a `- name: ... / sealed: ...` item at the end of `spec.credentials`
//!   (creating the key at the end of `spec` when absent), with the indentation of the items around it.
//!
//! Every edit is verified: the edited document is parsed again and must equal the original document with
//! exactly the intended change. When a text edit cannot be made or does not verify (an exotic layout such
//! as a flow-style list), adding a credential falls back to re-serialising that one document, and says so
//! (its comments are lost); replacing a token never falls back, it fails.

use std::ops::Range;

use serde_yaml::{Mapping, Value};

/// What a manifest problem is. Messages name files, documents and credentials, never values.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {doc}: not valid YAML: {message}")]
    Yaml { doc: usize, message: String },
    #[error("document {doc} ({resource}): {message}")]
    Resource {
        doc: usize,
        resource: String,
        message: String,
    },
    #[error("no MCPDeployment named {0} in the manifest")]
    NotFound(String),
    #[error("document {doc}: the edit could not be verified: {message}")]
    Unverified { doc: usize, message: String },
}

/// A YAML file split into documents, each with its text range and parsed value.
#[derive(Debug, Clone)]
pub struct Manifest {
    text: String,
    docs: Vec<Doc>,
}

#[derive(Debug, Clone)]
struct Doc {
    range: Range<usize>,
    /// `None` for a document with no content (only comments or markers).
    value: Option<Value>,
}

/// One credential of an MCPDeployment found in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundCredential {
    /// 1-based document number in the file.
    pub doc: usize,
    pub namespace: Option<String>,
    pub resource: String,
    pub name: String,
    /// The sealed value text, or `None` for a `secretKeyRef` (or otherwise unsealed) credential.
    pub sealed: Option<String>,
}

/// Whether [`Manifest::upsert_credential`] kept the formatting or had to re-serialise a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditKind {
    InPlace,
    Reserialised,
}

fn is_marker(line: &str) -> bool {
    let l = line.trim_end_matches(['\r', '\n']);
    l == "---" || l.starts_with("--- ") || l.starts_with("---\t")
}

fn is_content_line(line: &str) -> bool {
    let t = line.trim();
    !(t.is_empty() || t.starts_with('#') || t == "..." || is_marker(line))
}

/// Lines with their byte offsets (each line keeps its `\n`).
fn lines_with_offsets(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        out.push((pos, line));
        pos += line.len();
    }
    out
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let mut starts = vec![0];
        for (off, line) in lines_with_offsets(text) {
            if off != 0 && is_marker(line) {
                starts.push(off);
            }
        }
        let mut docs = Vec::new();
        for (i, &start) in starts.iter().enumerate() {
            let end = starts.get(i + 1).copied().unwrap_or(text.len());
            let seg = &text[start..end];
            let value = if seg.lines().any(is_content_line) {
                Some(
                    serde_yaml::from_str::<Value>(seg).map_err(|e| ManifestError::Yaml {
                        doc: i + 1,
                        message: e.to_string(),
                    })?,
                )
            } else {
                None
            };
            docs.push(Doc {
                range: start..end,
                value,
            });
        }
        Ok(Manifest {
            text: text.to_owned(),
            docs,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every credential of every MCPDeployment document, in file order.
    pub fn credentials(&self) -> Vec<FoundCredential> {
        let mut out = Vec::new();
        for (i, doc) in self.docs.iter().enumerate() {
            let Some(v) = doc.value.as_ref().filter(|v| is_mcp_deployment(v)) else {
                continue;
            };
            let namespace = v["metadata"]["namespace"].as_str().map(str::to_owned);
            let resource = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let Some(creds) = v["spec"]["credentials"].as_sequence() else {
                continue;
            };
            for c in creds {
                out.push(FoundCredential {
                    doc: i + 1,
                    namespace: namespace.clone(),
                    resource: resource.clone(),
                    name: c["name"].as_str().unwrap_or_default().to_owned(),
                    sealed: c["sealed"].as_str().map(str::to_owned),
                });
            }
        }
        out
    }

    /// Replaces sealed value texts in document `doc` (1-based): every occurrence of each `old` token in
    /// that document's text becomes `new`. Verified by re-parsing.
    pub fn replace_tokens(
        &mut self,
        doc: usize,
        replacements: &[(String, String)],
    ) -> Result<(), ManifestError> {
        let d = self.doc(doc)?.clone();
        let mut seg = self.text[d.range.clone()].to_owned();
        let mut expected = d.value.clone().unwrap_or(Value::Null);
        for (old, new) in replacements {
            if !is_token_text(old) || !is_token_text(new) {
                return Err(ManifestError::Unverified {
                    doc,
                    message: "a sealed value is not a single-line token".into(),
                });
            }
            if !seg.contains(old.as_str()) {
                return Err(ManifestError::Unverified {
                    doc,
                    message:
                        "a sealed value is not written verbatim in the file (folded or escaped?)"
                            .into(),
                });
            }
            seg = seg.replace(old.as_str(), new);
            replace_in_strings(&mut expected, old, new);
        }
        self.splice_verified(doc, &seg, &expected)
    }

    /// Sets credential `name` of the MCPDeployment `resource` (in `namespace` if the document names one) to
    /// `sealed`, adding it when missing. Returns how the document was edited.
    pub fn upsert_credential(
        &mut self,
        namespace: &str,
        resource: &str,
        name: &str,
        sealed: &str,
    ) -> Result<EditKind, ManifestError> {
        let doc = self.find_resource(namespace, resource)?;
        let d = self.doc(doc)?.clone();
        let value = d.value.clone().unwrap_or(Value::Null);
        let label = format!("{namespace}/{resource}");
        let existing = value["spec"]["credentials"]
            .as_sequence()
            .and_then(|s| s.iter().find(|c| c["name"].as_str() == Some(name)));
        if let Some(c) = existing {
            let Some(old) = c["sealed"].as_str() else {
                return Err(ManifestError::Resource {
                    doc,
                    resource: label,
                    message: format!(
                        "credential {name} is not a sealed value (secretKeyRef?); remove it first"
                    ),
                });
            };
            let old = old.to_owned();
            if self.text[d.range.clone()].matches(old.as_str()).count() == 1 {
                self.replace_tokens(doc, &[(old, sealed.to_owned())])?;
                return Ok(EditKind::InPlace);
            }
        }
        let mut expected = value.clone();
        set_credential(&mut expected, name, sealed).map_err(|message| ManifestError::Resource {
            doc,
            resource: label.clone(),
            message,
        })?;
        if existing.is_none()
            && let Some(seg) = insert_credential_text(&self.text[d.range.clone()], name, sealed)
            && self.splice_verified(doc, &seg, &expected).is_ok()
        {
            return Ok(EditKind::InPlace);
        }
        let mut seg = String::new();
        if self.text[d.range.clone()]
            .lines()
            .next()
            .is_some_and(is_marker)
        {
            seg.push_str("---\n");
        }
        seg.push_str(
            &serde_yaml::to_string(&expected).map_err(|e| ManifestError::Unverified {
                doc,
                message: e.to_string(),
            })?,
        );
        self.splice_verified(doc, &seg, &expected)?;
        Ok(EditKind::Reserialised)
    }

    fn doc(&self, doc: usize) -> Result<&Doc, ManifestError> {
        doc.checked_sub(1)
            .and_then(|i| self.docs.get(i))
            .ok_or(ManifestError::Unverified {
                doc,
                message: "no such document".into(),
            })
    }

    /// The 1-based document holding MCPDeployment `resource`; a document without a namespace matches any.
    fn find_resource(&self, namespace: &str, resource: &str) -> Result<usize, ManifestError> {
        for (i, d) in self.docs.iter().enumerate() {
            let Some(v) = d.value.as_ref().filter(|v| is_mcp_deployment(v)) else {
                continue;
            };
            if v["metadata"]["name"].as_str() != Some(resource) {
                continue;
            }
            match v["metadata"]["namespace"].as_str() {
                Some(ns) if ns != namespace => continue,
                _ => return Ok(i + 1),
            }
        }
        Err(ManifestError::NotFound(format!("{namespace}/{resource}")))
    }

    fn splice_verified(
        &mut self,
        doc: usize,
        seg: &str,
        expected: &Value,
    ) -> Result<(), ManifestError> {
        let parsed: Value = serde_yaml::from_str(seg).map_err(|e| ManifestError::Unverified {
            doc,
            message: format!("edited document does not parse: {e}"),
        })?;
        if &parsed != expected {
            return Err(ManifestError::Unverified {
                doc,
                message: "edited document differs beyond the edit".into(),
            });
        }
        let range = self.doc(doc)?.range.clone();
        let mut text = String::with_capacity(self.text.len() + seg.len());
        text.push_str(&self.text[..range.start]);
        text.push_str(seg);
        text.push_str(&self.text[range.end..]);
        *self = Manifest::parse(&text)?;
        Ok(())
    }
}

fn is_mcp_deployment(v: &Value) -> bool {
    v["kind"].as_str() == Some("MCPDeployment")
}

fn is_token_text(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'='))
}

fn replace_in_strings(v: &mut Value, old: &str, new: &str) {
    match v {
        Value::String(s) if s.contains(old) => *s = s.replace(old, new),
        Value::Sequence(seq) => seq.iter_mut().for_each(|x| replace_in_strings(x, old, new)),
        Value::Mapping(m) => m
            .iter_mut()
            .for_each(|(_, x)| replace_in_strings(x, old, new)),
        Value::Tagged(t) => replace_in_strings(&mut t.value, old, new),
        _ => {}
    }
}

fn set_credential(doc: &mut Value, name: &str, sealed: &str) -> Result<(), String> {
    let spec = doc
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| "the resource has no spec mapping".to_owned())?;
    let creds = spec
        .entry(Value::from("credentials"))
        .or_insert(Value::Sequence(Vec::new()));
    if creds.is_null() {
        *creds = Value::Sequence(Vec::new());
    }
    let seq = creds
        .as_sequence_mut()
        .ok_or_else(|| "spec.credentials is not a list".to_owned())?;
    if let Some(c) = seq.iter_mut().find(|c| c["name"].as_str() == Some(name)) {
        c["sealed"] = Value::from(sealed);
    } else {
        let mut m = Mapping::new();
        m.insert("name".into(), name.into());
        m.insert("sealed".into(), sealed.into());
        seq.push(Value::Mapping(m));
    }
    Ok(())
}

/// Inserts a credential item into a document's text, keeping everything else byte for byte. `None` when
/// the layout is not one this handles (the caller then re-serialises).
fn insert_credential_text(seg: &str, name: &str, sealed: &str) -> Option<String> {
    let lines = lines_with_offsets(seg);
    let eol = if seg.contains("\r\n") { "\r\n" } else { "\n" };
    let top_key = |l: &str, key: &str| {
        l.strip_prefix(key).is_some_and(|r| {
            let r = r.trim_start_matches([' ', '\t']);
            r.is_empty() || r.starts_with('#') || r.starts_with('\r') || r.starts_with('\n')
        })
    };
    let spec_idx = lines.iter().position(|(_, l)| top_key(l, "spec:"))?;
    // The spec block: following lines until the next content line at column 0.
    let mut spec_end = lines.len();
    for (j, (_, l)) in lines.iter().enumerate().skip(spec_idx + 1) {
        if is_content_line(l) && indent_of(l) == 0 {
            spec_end = j;
            break;
        }
    }
    let block = spec_idx + 1..spec_end;
    let child_indent = block
        .clone()
        .map(|j| lines[j].1)
        .find(|l| is_content_line(l))
        .map(indent_of)?;
    if child_indent == 0 {
        return None;
    }
    let last_content = |range: Range<usize>| range.rev().find(|&j| is_content_line(lines[j].1));
    let pad = |n: usize| " ".repeat(n);
    let item = |dash: usize, inner: usize| {
        format!(
            "{}- name: {name}{eol}{}sealed: {sealed}{eol}",
            pad(dash),
            pad(inner)
        )
    };
    let insert_after = |j: usize, text: String| {
        let (off, l) = lines[j];
        let at = off + l.len();
        let mut out = seg[..at].to_owned();
        if !l.ends_with('\n') {
            out.push_str(eol);
        }
        out.push_str(&text);
        out.push_str(&seg[at..]);
        out
    };
    let creds_idx = block.clone().find(|&j| {
        let l = lines[j].1;
        indent_of(l) == child_indent && l[child_indent..].starts_with("credentials:")
    });
    let Some(ci) = creds_idx else {
        let last = last_content(block)?;
        let text = format!(
            "{}credentials:{eol}{}",
            pad(child_indent),
            item(child_indent + 2, child_indent + 4)
        );
        return Some(insert_after(last, text));
    };
    let line = lines[ci].1;
    let rest = line[child_indent + "credentials:".len()..]
        .split('#')
        .next()
        .unwrap_or_default()
        .trim();
    if rest == "[]" {
        let (off, l) = lines[ci];
        let text = format!(
            "{}credentials:{eol}{}",
            pad(child_indent),
            item(child_indent + 2, child_indent + 4)
        );
        return Some(format!("{}{}{}", &seg[..off], text, &seg[off + l.len()..]));
    }
    if !rest.is_empty() {
        return None; // a flow-style list or a scalar: not edited as text
    }
    // The list's items: lines after `credentials:` more indented than the key, or `- ` at the key's column.
    let mut end = ci + 1;
    while end < spec_end {
        let l = lines[end].1;
        let belongs = !is_content_line(l)
            || indent_of(l) > child_indent
            || (indent_of(l) == child_indent && l[child_indent..].starts_with('-'));
        if !belongs {
            break;
        }
        end += 1;
    }
    let first_item = (ci + 1..end)
        .map(|j| lines[j].1)
        .find(|l| l.trim_start().starts_with('-'));
    let (dash, inner) = match first_item {
        Some(l) => {
            let dash = indent_of(l);
            let after = &l[dash + 1..];
            let gap = after.len() - after.trim_start_matches(' ').len();
            if after.trim().is_empty() || gap == 0 {
                (dash, dash + 2)
            } else {
                (dash, dash + 1 + gap)
            }
        }
        None => (child_indent + 2, child_indent + 4),
    };
    let last = last_content(ci..end)?;
    Some(insert_after(last, item(dash, inner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"# top comment
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated, namespace: team-a}
data:
  k: v
---
apiVersion: mcpfly.dev/v1alpha1
kind: MCPDeployment
metadata:
  name: github   # the resource
  namespace: team-a
spec:
  source:
    npm: {package: "@modelcontextprotocol/server-github", version: "2025.4.8"}
  credentials:
    # the PAT
    - name: A
      sealed: 00000000.gAAAAold   # keep me
    - name: B
      secretKeyRef: {name: s, key: k}
  fly:
    regions: [iad]
---
# trailing document comment
"#;

    #[test]
    fn finds_credentials() {
        let m = Manifest::parse(MANIFEST).unwrap();
        let c = m.credentials();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].doc, 2);
        assert_eq!(c[0].namespace.as_deref(), Some("team-a"));
        assert_eq!(c[0].resource, "github");
        assert_eq!(c[0].sealed.as_deref(), Some("00000000.gAAAAold"));
        assert_eq!(c[1].sealed, None);
    }

    #[test]
    fn replace_keeps_everything_else() {
        let mut m = Manifest::parse(MANIFEST).unwrap();
        m.replace_tokens(
            2,
            &[("00000000.gAAAAold".into(), "11111111.gAAAAnew".into())],
        )
        .unwrap();
        assert_eq!(
            m.text(),
            MANIFEST.replace("00000000.gAAAAold", "11111111.gAAAAnew")
        );
    }

    #[test]
    fn upsert_existing_in_place() {
        let mut m = Manifest::parse(MANIFEST).unwrap();
        assert_eq!(
            m.upsert_credential("team-a", "github", "A", "22222222.gAAAAx")
                .unwrap(),
            EditKind::InPlace
        );
        assert_eq!(
            m.text(),
            MANIFEST.replace("00000000.gAAAAold", "22222222.gAAAAx")
        );
        assert!(
            m.upsert_credential("team-a", "github", "B", "22222222.gAAAAx")
                .is_err()
        );
        assert!(matches!(
            m.upsert_credential("team-b", "github", "A", "x"),
            Err(ManifestError::NotFound(_))
        ));
    }

    #[test]
    fn upsert_new_appends_item_in_place() {
        let mut m = Manifest::parse(MANIFEST).unwrap();
        assert_eq!(
            m.upsert_credential("team-a", "github", "C", "33333333.gAAAAc")
                .unwrap(),
            EditKind::InPlace
        );
        let expected = MANIFEST.replace(
            "      secretKeyRef: {name: s, key: k}\n",
            "      secretKeyRef: {name: s, key: k}\n    - name: C\n      sealed: 33333333.gAAAAc\n",
        );
        assert_eq!(m.text(), expected);
    }

    #[test]
    fn upsert_creates_credentials_key() {
        let text = "kind: MCPDeployment\nmetadata:\n  name: r\nspec:\n  # comment\n  env: {A: b}\nstatus: {}\n";
        let mut m = Manifest::parse(text).unwrap();
        assert_eq!(
            m.upsert_credential("ns", "r", "X", "44444444.gAAAAx")
                .unwrap(),
            EditKind::InPlace
        );
        assert_eq!(
            m.text(),
            "kind: MCPDeployment\nmetadata:\n  name: r\nspec:\n  # comment\n  env: {A: b}\n  credentials:\n    - name: X\n      sealed: 44444444.gAAAAx\nstatus: {}\n"
        );
        let text = "kind: MCPDeployment\nmetadata:\n  name: r\nspec:\n  credentials: []  # none yet\n  env: {}\n";
        let mut m = Manifest::parse(text).unwrap();
        assert_eq!(
            m.upsert_credential("ns", "r", "X", "4.x").unwrap(),
            EditKind::InPlace
        );
        assert_eq!(
            m.text(),
            "kind: MCPDeployment\nmetadata:\n  name: r\nspec:\n  credentials:\n    - name: X\n      sealed: 4.x\n  env: {}\n"
        );
        // Dash at the key's column, CRLF line ends.
        let text = "kind: MCPDeployment\r\nmetadata:\r\n  name: r\r\nspec:\r\n  credentials:\r\n  - name: A\r\n    sealed: 1.a\r\n";
        let mut m = Manifest::parse(text).unwrap();
        assert_eq!(
            m.upsert_credential("ns", "r", "B", "2.b").unwrap(),
            EditKind::InPlace
        );
        assert_eq!(
            m.text(),
            format!("{text}  - name: B\r\n    sealed: 2.b\r\n")
        );
    }

    #[test]
    fn flow_list_falls_back_to_reserialising_one_document() {
        let text = "# keep\nkind: Other\n---\nkind: MCPDeployment\nmetadata: {name: r, namespace: ns}\nspec: {credentials: [{name: A, sealed: 1.a}], env: {K: v}}\n";
        let mut m = Manifest::parse(text).unwrap();
        assert_eq!(
            m.upsert_credential("ns", "r", "B", "2.b").unwrap(),
            EditKind::Reserialised
        );
        assert!(m.text().starts_with("# keep\nkind: Other\n---\n"));
        let c = m.credentials();
        assert_eq!(
            c.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["A", "B"]
        );
        let v: Value = serde_yaml::from_str(m.text().split("---\n").nth(1).unwrap()).unwrap();
        assert_eq!(v["spec"]["env"]["K"].as_str(), Some("v"));
    }

    proptest::proptest! {
        /// Parsing and listing credentials never panic on arbitrary text, and inserting a credential into
        /// generated layouts either verifies or falls back, never corrupts other content.
        #[test]
        fn parse_is_total(text in "(\\PC|\n| |-|:|#){0,300}") {
            if let Ok(m) = Manifest::parse(&text) {
                let _ = m.credentials();
            }
        }

        #[test]
        fn upsert_keeps_other_content(
            indent in 1usize..5,
            dash_at_key in proptest::bool::ANY,
            n in 0usize..3,
            comment in proptest::bool::ANY,
        ) {
            let pad = " ".repeat(indent);
            let dash = if dash_at_key { pad.clone() } else { format!("{pad}{pad}") };
            let mut text = format!("kind: MCPDeployment\nmetadata:\n{pad}name: r\nspec:\n{pad}env: {{A: b}}\n");
            if n > 0 {
                text.push_str(&format!("{pad}credentials:\n"));
                for i in 0..n {
                    text.push_str(&format!("{dash}- name: N{i}\n{dash}  sealed: {i}.tok{i}\n"));
                    if comment {
                        text.push_str(&format!("{dash}# after {i}\n"));
                    }
                }
            }
            text.push_str("status: {}\n");
            let mut m = Manifest::parse(&text).unwrap();
            let kind = m.upsert_credential("ns", "r", "NEW", "9.new").unwrap();
            proptest::prop_assert_eq!(kind, EditKind::InPlace);
            let names: Vec<String> = m.credentials().into_iter().map(|c| c.name).collect();
            proptest::prop_assert_eq!(names.len(), n + 1);
            proptest::prop_assert_eq!(names.last().map(String::as_str), Some("NEW"));
            // Every original line is still there, in order.
            let mut rest = m.text();
            for line in text.lines() {
                let at = rest.find(line);
                proptest::prop_assert!(at.is_some(), "lost line {:?}", line);
                rest = &rest[at.unwrap() + line.len()..];
            }
        }
    }
}
