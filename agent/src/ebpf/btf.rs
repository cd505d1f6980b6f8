//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`), enough to
//! find the byte offset of a struct member by name.
//!
//! aya parses BTF too, but keeps struct members crate-private; what we need
//! is a few dozen lines of the documented format
//! (Documentation/bpf/btf.rst), so it lives here with its own tests.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("BTF is truncated or malformed: {0}")]
    Malformed(&'static str),
    #[error("BTF has bad magic {0:#06x} (big-endian BTF is not supported)")]
    BadMagic(u16),
    #[error("BTF has no struct named `{0}`")]
    NoStruct(String),
    #[error("struct `{strukt}` has no member `{member}` in this kernel's BTF")]
    NoMember { strukt: String, member: String },
    #[error("member `{strukt}.{member}` is not a struct, cannot look inside it")]
    NotAStruct { strukt: String, member: String },
    #[error("member `{strukt}.{member}` is a bit-field, not byte-addressable")]
    BitField { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
pub const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
pub const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A member of a struct or union, decoded on demand.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// The types of one BTF blob, indexed but not decoded: the kernel's BTF has
/// some 100,000 types, and decoding them all (as a general BTF library does)
/// costs tens of MiB for the three offsets we need.
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Byte offset of each type in `types`; index = type id (0 is void).
    type_offsets: Vec<u32>,
}

fn read_u32(data: &[u8], at: usize) -> Result<u32, BtfError> {
    let bytes = data
        .get(at..at + 4)
        .ok_or(BtfError::Malformed("read past end"))?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn str_at(strings: &[u8], offset: u32) -> &[u8] {
    let tail = strings.get(offset as usize..).unwrap_or(&[]);
    let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
    &tail[..end]
}

/// Bytes that follow a type's 12-byte header, by kind.
fn trailing_len(kind: u32, vlen: usize) -> usize {
    match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        _ => 0,
    }
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let magic = u16::from_le_bytes([
            *data.first().ok_or(BtfError::Malformed("empty"))?,
            *data.get(1).ok_or(BtfError::Malformed("empty"))?,
        ]);
        if magic != MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        let header_len = read_u32(data, 4)? as usize;
        let type_off = read_u32(data, 8)? as usize;
        let type_len = read_u32(data, 12)? as usize;
        let str_off = read_u32(data, 16)? as usize;
        let str_len = read_u32(data, 20)? as usize;
        let types = data
            .get(header_len + type_off..header_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;

        let mut type_offsets = vec![0u32];
        let mut at = 0usize;
        while at < types.len() {
            let info = read_u32(types, at + 4)?;
            type_offsets.push(at as u32);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            at += 12 + trailing_len(kind, vlen);
        }
        if at != types.len() {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }
        Ok(Self {
            types,
            strings,
            type_offsets,
        })
    }

    /// (kind, vlen, kind_flag, size_or_type, name) of a type.
    fn header(&self, id: u32) -> Option<(u32, usize, bool, u32, &'a [u8])> {
        let at = *self.type_offsets.get(id as usize)? as usize;
        if id == 0 {
            return None;
        }
        let name_off = read_u32(self.types, at).ok()?;
        let info = read_u32(self.types, at + 4).ok()?;
        let size_or_type = read_u32(self.types, at + 8).ok()?;
        Some((
            (info >> 24) & 0x1f,
            (info & 0xffff) as usize,
            info >> 31 == 1,
            size_or_type,
            str_at(self.strings, name_off),
        ))
    }

    fn members(&self, id: u32) -> Option<impl Iterator<Item = Member> + '_> {
        let (kind, vlen, kind_flag, _, _) = self.header(id)?;
        if kind != KIND_STRUCT && kind != KIND_UNION {
            return None;
        }
        let base = *self.type_offsets.get(id as usize)? as usize + 12;
        Some((0..vlen).filter_map(move |index| {
            let at = base + index * 12;
            let offset = read_u32(self.types, at + 8).ok()?;
            let (bit_offset, bitfield_size) = if kind_flag {
                (offset & 0x00ff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            Some(Member {
                name_off: read_u32(self.types, at).ok()?,
                type_id: read_u32(self.types, at + 4).ok()?,
                bit_offset,
                bitfield_size,
            })
        }))
    }

    /// Looks through typedef, const, volatile, restrict and type tags.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.header(id) {
                Some((
                    KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG,
                    _,
                    _,
                    target,
                    _,
                )) => {
                    id = target;
                }
                _ => break,
            }
        }
        id
    }

    /// The first struct named `name` that has members (vmlinux may also
    /// carry an empty forward-declared twin).
    fn find_struct(&self, name: &str) -> Option<u32> {
        (1..self.type_offsets.len() as u32).find(|id| {
            matches!(self.header(*id), Some((KIND_STRUCT, vlen, _, _, n)) if vlen > 0 && n == name.as_bytes())
        })
    }

    /// Byte offset of `path` (e.g. `["se", "sum_exec_runtime"]`) inside the
    /// struct `strukt`, looking through anonymous structs and unions.
    pub fn member_offset(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut type_id = self
            .find_struct(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut current_name = strukt.to_owned();
        let mut total_bits = 0u32;
        for member_name in path {
            if self.members(type_id).is_none() {
                return Err(BtfError::NotAStruct {
                    strukt: current_name,
                    member: (*member_name).to_owned(),
                });
            }
            let (bits, member) =
                self.find_member(type_id, member_name, 0)
                    .ok_or_else(|| BtfError::NoMember {
                        strukt: current_name.clone(),
                        member: (*member_name).to_owned(),
                    })?;
            if member.bitfield_size != 0 || bits % 8 != 0 {
                return Err(BtfError::BitField {
                    strukt: current_name,
                    member: (*member_name).to_owned(),
                });
            }
            total_bits += bits;
            type_id = self.resolve(member.type_id);
            current_name = format!("{current_name}.{member_name}");
        }
        Ok(total_bits / 8)
    }

    /// A BTF blob with the same type ids as this one, in which only the
    /// named types keep their name and kind; every other type becomes an
    /// anonymous `void *`. aya looks programs' attach points up by name in
    /// the kernel's BTF (`bpf_iter_task`, `btf_trace_sched_switch`); handing
    /// it this stand-in instead of the whole vmlinux BTF saves ~25 MiB of
    /// peak memory at load time, while the kernel still checks the ids
    /// against its own BTF.
    pub fn attach_points_only(&self, wanted: &[(u32, &str)]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut types = Vec::with_capacity(self.type_offsets.len() * 12);
        for id in 1..self.type_offsets.len() as u32 {
            let (mut name_off, mut info, mut target) = (0u32, KIND_PTR << 24, 0u32);
            if let Some((kind, vlen, _, size_or_type, name)) = self.header(id)
                && wanted
                    .iter()
                    .any(|(k, n)| *k == kind && n.as_bytes() == name)
                && (kind == KIND_FUNC || kind == KIND_TYPEDEF)
            {
                name_off = strings.len() as u32;
                strings.extend_from_slice(name);
                strings.push(0);
                info = (kind << 24) | vlen as u32;
                // Keep the referenced id (a prototype or typedef target);
                // aya does not follow it.
                target = size_or_type;
            }
            for word in [name_off, info, target] {
                types.extend_from_slice(&word.to_le_bytes());
            }
        }
        let mut out = Vec::with_capacity(24 + types.len() + strings.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    /// The id of the type `name` of `kind`.
    pub fn type_id(&self, kind: u32, name: &str) -> Option<u32> {
        (1..self.type_offsets.len() as u32)
            .find(|id| matches!(self.header(*id), Some((k, _, _, _, n)) if k == kind && n == name.as_bytes()))
    }

    fn find_member(&self, type_id: u32, name: &str, depth: u32) -> Option<(u32, Member)> {
        if depth > 8 {
            return None;
        }
        if let Some(member) = self
            .members(type_id)?
            .find(|m| str_at(self.strings, m.name_off) == name.as_bytes())
        {
            return Some((member.bit_offset, member));
        }
        for anonymous in self.members(type_id)?.filter(|m| m.name_off == 0) {
            let inner = self.resolve(anonymous.type_id);
            if let Some((bits, member)) = self.find_member(inner, name, depth + 1) {
                return Some((anonymous.bit_offset + bits, member));
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds BTF blobs for tests: strings, then types, like pahole does.
    #[derive(Default)]
    pub(crate) struct BtfBuilder {
        strings: Vec<u8>,
        types: Vec<u8>,
        next_id: u32,
    }

    impl BtfBuilder {
        pub(crate) fn new() -> Self {
            Self {
                strings: vec![0],
                types: Vec::new(),
                next_id: 1,
            }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let offset = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            offset
        }

        fn header(&mut self, name: &str, kind: u32, vlen: u32, kind_flag: bool, size: u32) -> u32 {
            let name = self.string(name);
            let info = (u32::from(kind_flag) << 31) | (kind << 24) | vlen;
            for word in [name, info, size] {
                self.types.extend_from_slice(&word.to_le_bytes());
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        pub(crate) fn int(&mut self, name: &str, bytes: u32) -> u32 {
            let id = self.header(name, KIND_INT, 0, false, bytes);
            self.types.extend_from_slice(&(bytes * 8).to_le_bytes());
            id
        }

        pub(crate) fn typedef(&mut self, name: &str, target: u32) -> u32 {
            self.header(name, KIND_TYPEDEF, 0, false, target)
        }

        /// Members as (name, type id, bit offset, bit-field size).
        pub(crate) fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let kind_flag = members.iter().any(|m| m.3 != 0);
            let names: Vec<u32> = members.iter().map(|m| self.string(m.0)).collect();
            let id = self.header(name, kind, members.len() as u32, kind_flag, size);
            for (member, name) in members.iter().zip(names) {
                let offset = if kind_flag {
                    (member.3 << 24) | member.2
                } else {
                    member.2
                };
                for word in [name, member.1, offset] {
                    self.types.extend_from_slice(&word.to_le_bytes());
                }
            }
            id
        }

        pub(crate) fn strukt(
            &mut self,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            self.composite(KIND_STRUCT, name, size, members)
        }

        pub(crate) fn union(&mut self, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
            self.composite(KIND_UNION, "", size, members)
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            out.extend_from_slice(&24u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    #[test]
    fn finds_nested_and_anonymous_members() {
        let mut b = BtfBuilder::new();
        let u64_id = b.int("unsigned long long", 8);
        let u64_t = b.typedef("u64", u64_id);
        let se = b.strukt(
            "sched_entity",
            64,
            &[("load", u64_t, 0, 0), ("sum_exec_runtime", u64_t, 256, 0)],
        );
        let anon = b.union(8, &[("pid_alias", u64_t, 0, 0), ("", u64_t, 0, 0)]);
        let flags = b.int("unsigned int", 4);
        let task = b.strukt(
            "task_struct",
            512,
            &[
                ("state", flags, 0, 0),
                ("bits", flags, 32, 3),
                ("se", se, 1024, 0),
                ("", anon, 2048, 0),
            ],
        );
        assert!(task > 0);
        let data = b.build();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(
            btf.member_offset("task_struct", &["se", "sum_exec_runtime"]),
            Ok(128 + 32)
        );
        assert_eq!(btf.member_offset("task_struct", &["pid_alias"]), Ok(256));
        assert_eq!(
            btf.member_offset("task_struct", &["bits"]),
            Err(BtfError::BitField {
                strukt: "task_struct".into(),
                member: "bits".into()
            })
        );
        assert_eq!(
            btf.member_offset("task_struct", &["nope"]),
            Err(BtfError::NoMember {
                strukt: "task_struct".into(),
                member: "nope".into()
            })
        );
        assert_eq!(
            btf.member_offset("cgroup", &["kn"]),
            Err(BtfError::NoStruct("cgroup".into()))
        );
    }

    #[test]
    fn attach_points_only_keeps_ids_and_names() {
        let mut b = BtfBuilder::new();
        let int = b.int("int", 4);
        let typedef = b.typedef("btf_trace_sched_switch", int);
        let other = b.typedef("unrelated", int);
        let data = b.build();
        let full = Btf::parse(&data).unwrap();
        let small_bytes = full.attach_points_only(&[(KIND_TYPEDEF, "btf_trace_sched_switch")]);
        let small = Btf::parse(&small_bytes).unwrap();
        assert_eq!(
            small.type_id(KIND_TYPEDEF, "btf_trace_sched_switch"),
            Some(typedef)
        );
        assert_eq!(small.type_id(KIND_TYPEDEF, "unrelated"), None);
        assert_eq!(full.type_id(KIND_TYPEDEF, "unrelated"), Some(other));
        // aya reads the stand-in the same way.
        let aya = aya::Btf::parse(&small_bytes, aya::Endianness::default()).unwrap();
        assert_eq!(
            aya.id_by_type_name_kind("btf_trace_sched_switch", aya_obj_kind_typedef())
                .ok(),
            Some(typedef)
        );
    }

    fn aya_obj_kind_typedef() -> aya_obj::btf::BtfKind {
        aya_obj::btf::BtfKind::Typedef
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(Btf::parse(&[]), Err(BtfError::Malformed(_))));
        assert_eq!(
            Btf::parse(&[0x12, 0x34, 0, 0]).err(),
            Some(BtfError::BadMagic(0x3412))
        );
        let mut truncated = BtfBuilder::new();
        truncated.int("int", 4);
        let mut blob = truncated.build();
        blob[12] = 0xff; // type_len far past the end
        assert!(matches!(Btf::parse(&blob), Err(BtfError::Malformed(_))));
    }

    #[test]
    fn parses_the_running_kernels_btf_when_present() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipping: /sys/kernel/btf/vmlinux not readable");
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        let offset = btf
            .member_offset("task_struct", &["se", "sum_exec_runtime"])
            .unwrap();
        assert!(offset > 0);
        assert!(btf.member_offset("kernfs_node", &["id"]).is_ok());
    }
}
