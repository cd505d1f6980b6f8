//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`), enough to
//! find the byte offset of a struct member by name.
//!
//! aya parses BTF too, but keeps struct members crate-private; what we need
//! is a few dozen lines of the documented format
//! (Documentation/bpf/btf.rst), so it lives here with its own tests.

use std::collections::HashMap;

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
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Clone, Debug)]
enum Type {
    Composite {
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type tag: look through.
    Alias {
        target: u32,
    },
    Other,
}

/// The parsed types of one BTF blob.
pub struct Btf {
    /// Indexed by type id; id 0 is `void`.
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn read_u32(data: &[u8], at: usize) -> Result<u32, BtfError> {
    let bytes = data
        .get(at..at + 4)
        .ok_or(BtfError::Malformed("read past end"))?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn read_str(strings: &[u8], offset: u32) -> Result<String, BtfError> {
    let tail = strings
        .get(offset as usize..)
        .ok_or(BtfError::Malformed("string offset past end"))?;
    let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
    Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
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
        let types_data = data
            .get(header_len + type_off..header_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;

        let mut types = vec![Type::Other];
        let mut structs_by_name = HashMap::new();
        let mut at = 0usize;
        while at < types_data.len() {
            let name_off = read_u32(types_data, at)?;
            let info = read_u32(types_data, at + 4)?;
            let size_or_type = read_u32(types_data, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let id = types.len() as u32;
            let parsed = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for index in 0..vlen {
                        let base = at + index * 12;
                        let offset = read_u32(types_data, base + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0x00ff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name: read_str(strings, read_u32(types_data, base)?)?,
                            type_id: read_u32(types_data, base + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    at += vlen * 12;
                    if kind == KIND_STRUCT {
                        let name = read_str(strings, name_off)?;
                        // vmlinux may carry a forward-declared twin; keep
                        // the first definition that has members.
                        if !name.is_empty() && !members.is_empty() {
                            structs_by_name.entry(name).or_insert(id);
                        }
                    }
                    Type::Composite { members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        target: size_or_type,
                    }
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_ENUM | KIND_FUNC_PROTO => {
                    at += vlen * 8;
                    Type::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    at += vlen * 12;
                    Type::Other
                }
                // PTR, FWD, FUNC, FLOAT carry nothing after the header.
                _ => Type::Other,
            };
            types.push(parsed);
        }
        if at != types_data.len() {
            return Err(BtfError::Malformed("type section ends inside a type"));
        }
        Ok(Self {
            types,
            structs_by_name,
        })
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Type::Alias { target }) => id = *target,
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `path` (e.g. `["se", "sum_exec_runtime"]`) inside the
    /// struct `strukt`, looking through anonymous structs and unions.
    pub fn member_offset(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut type_id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut current_name = strukt.to_owned();
        let mut total_bits = 0u32;
        for (depth, member_name) in path.iter().enumerate() {
            let Some(Type::Composite { members }) = self.types.get(type_id as usize) else {
                return Err(BtfError::NotAStruct {
                    strukt: current_name,
                    member: (*member_name).to_owned(),
                });
            };
            let (bits, member) =
                self.find_member(members, member_name, 0)
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
            current_name = if depth == 0 {
                format!("{strukt}.{member_name}")
            } else {
                format!("{current_name}.{member_name}")
            };
        }
        Ok(total_bits / 8)
    }

    fn find_member<'a>(
        &'a self,
        members: &'a [Member],
        name: &str,
        depth: u32,
    ) -> Option<(u32, &'a Member)> {
        if depth > 8 {
            return None;
        }
        if let Some(member) = members.iter().find(|m| m.name == name) {
            return Some((member.bit_offset, member));
        }
        for anonymous in members.iter().filter(|m| m.name.is_empty()) {
            let inner_id = self.resolve(anonymous.type_id);
            if let Some(Type::Composite { members: inner }) = self.types.get(inner_id as usize)
                && let Some((bits, member)) = self.find_member(inner, name, depth + 1)
            {
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
        let btf = Btf::parse(&b.build()).unwrap();
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
