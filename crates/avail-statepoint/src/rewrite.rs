//! The load-time module rewrite that makes every piece of guest state reachable.
//!
//! wasmtime's API reaches only exported items, so the module is rewritten (section by
//! section, everything else copied byte for byte) so that:
//! - every memory is exported as `__avail_memory_<i>`,
//! - every mutable global as `__avail_global_<i>` (immutable globals are recreated
//!   identically by instantiation),
//! - the start function, if any, is removed from the start section and exported as
//!   `__avail_start`: the engine calls it once on a fresh start and never on a restore.
//!
//! Tables are not captured: modules that could change a table at run time (`table.set`,
//! `table.grow`, `table.fill`, `table.copy`, `table.init`, `elem.drop`) are refused, so a
//! table is always what instantiation makes it. Also refused, with the reason: shared
//! memories, GC types (structs and arrays live on a heap outside linear memory), mutable
//! globals of reference type, tables of anything but `funcref`,
//! imported memories, tables or globals (state that lives outside the instance), and
//! function imports outside the `avail` host ABI.

use wasm_encoder::{ExportKind, ExportSection, RawSection};
use wasmparser::{
    CompositeInnerType, ExternalKind, Operator, Parser, Payload, RefType, TypeRef, ValType,
    Validator, WasmFeatures,
};

/// Prefix of the names the rewrite adds; a module may not use it.
pub const RESERVED_PREFIX: &str = "__avail_";
/// Export name of the former start function.
pub const START_EXPORT: &str = "__avail_start";

/// Export name of memory `i`.
pub fn memory_export(i: usize) -> String {
    format!("{RESERVED_PREFIX}memory_{i}")
}

/// Export name of global `i` (index among the module's globals).
pub fn global_export(i: u32) -> String {
    format!("{RESERVED_PREFIX}global_{i}")
}

/// Where the state of a rewritten module is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateLayout {
    /// Export names of the memories, in index order.
    pub memories: Vec<String>,
    /// Export names and types of the mutable globals, in index order.
    pub globals: Vec<(String, GlobalKind)>,
    /// Whether the module had a start function (now exported as [`START_EXPORT`]).
    pub has_start: bool,
}

/// The value type of a capturable global.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalKind {
    /// i32.
    I32,
    /// i64.
    I64,
    /// f32.
    F32,
    /// f64.
    F64,
    /// v128.
    V128,
}

/// A rewritten module and the layout of its state.
#[derive(Clone, Debug)]
pub struct Rewritten {
    /// The rewritten module bytes.
    pub bytes: Vec<u8>,
    /// Where its state is.
    pub layout: StateLayout,
}

/// Why a module cannot run at level `ft`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("module cannot run at level ft: {0}")]
pub struct Refused(pub String);

fn refuse<T>(why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(why.into()))
}

/// Rewrite `module` (see the module docs), or say why its state cannot be captured.
pub fn rewrite(module: &[u8]) -> Result<Rewritten, Refused> {
    Validator::new_with_features(WasmFeatures::default())
        .validate_all(module)
        .map_err(|e| Refused(format!("invalid module: {e}")))?;
    let mut memories = 0usize;
    let mut globals = Vec::new();
    let mut global_index = 0u32;
    let mut start = None;
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    let mut sections: Vec<(u8, std::ops::Range<usize>)> = Vec::new();
    let bad = |e: wasmparser::BinaryReaderError| Refused(format!("invalid module: {e}"));
    for payload in Parser::new(0).parse_all(module) {
        let payload = payload.map_err(bad)?;
        if let Some(s) = payload.as_section() {
            sections.push(s);
        }
        match payload {
            Payload::TypeSection(r) => {
                for group in r {
                    for ty in group.map_err(bad)?.types() {
                        if !matches!(ty.composite_type.inner, CompositeInnerType::Func(_)) {
                            return refuse(
                                "declares GC types (struct or array): objects on the GC heap are not captured",
                            );
                        }
                    }
                }
            }
            Payload::ImportSection(r) => {
                for imp in r.into_imports() {
                    let imp = imp.map_err(bad)?;
                    match imp.ty {
                        TypeRef::Func(_) | TypeRef::FuncExact(_) if imp.module == "avail" => {}
                        TypeRef::Func(_) | TypeRef::FuncExact(_) => {
                            return refuse(format!(
                                "imports {}.{}, outside the avail host ABI",
                                imp.module, imp.name
                            ));
                        }
                        _ => {
                            return refuse(format!(
                                "imports {}.{}, a memory, table or global whose state lives outside the instance",
                                imp.module, imp.name
                            ));
                        }
                    }
                }
            }
            Payload::MemorySection(r) => {
                for m in r {
                    if m.map_err(bad)?.shared {
                        return refuse("has a shared memory (threads)");
                    }
                    memories += 1;
                }
            }
            Payload::TableSection(r) => {
                for t in r {
                    if t.map_err(bad)?.ty.element_type != RefType::FUNCREF {
                        return refuse("has a table of references other than funcref");
                    }
                }
            }
            Payload::GlobalSection(r) => {
                for g in r {
                    let ty = g.map_err(bad)?.ty;
                    if ty.mutable {
                        let kind = match ty.content_type {
                            ValType::I32 => GlobalKind::I32,
                            ValType::I64 => GlobalKind::I64,
                            ValType::F32 => GlobalKind::F32,
                            ValType::F64 => GlobalKind::F64,
                            ValType::V128 => GlobalKind::V128,
                            ValType::Ref(_) => {
                                return refuse(
                                    "has a mutable global holding a reference (externref, GC)",
                                );
                            }
                        };
                        globals.push((global_export(global_index), kind));
                    }
                    global_index += 1;
                }
            }
            Payload::ExportSection(r) => {
                for e in r {
                    let e = e.map_err(bad)?;
                    if e.name.starts_with(RESERVED_PREFIX) {
                        return refuse(format!("exports {:?}, a name reserved by avail", e.name));
                    }
                    exports.push((e.name.to_string(), e.kind, e.index));
                }
            }
            Payload::StartSection { func, .. } => start = Some(func),
            Payload::CodeSectionEntry(body) => {
                let mut ops = body.get_operators_reader().map_err(bad)?;
                while !ops.eof() {
                    let name = match ops.read().map_err(bad)? {
                        Operator::TableSet { .. } => "table.set",
                        Operator::TableGrow { .. } => "table.grow",
                        Operator::TableFill { .. } => "table.fill",
                        Operator::TableCopy { .. } => "table.copy",
                        Operator::TableInit { .. } => "table.init",
                        Operator::ElemDrop { .. } => "elem.drop",
                        _ => continue,
                    };
                    return refuse(format!("changes a table at run time ({name})"));
                }
            }
            _ => {}
        }
    }
    if !sections
        .iter()
        .any(|(id, _)| *id == wasm_encoder::SectionId::Export as u8)
    {
        return refuse("has no exports (guest ABI v1 needs memory, avail_alloc, avail_handle)");
    }

    let mut export_section = ExportSection::new();
    for (name, kind, index) in &exports {
        let kind = match kind {
            ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
            ExternalKind::Table => ExportKind::Table,
            ExternalKind::Memory => ExportKind::Memory,
            ExternalKind::Global => ExportKind::Global,
            ExternalKind::Tag => ExportKind::Tag,
        };
        export_section.export(name, kind, *index);
    }
    let layout = StateLayout {
        memories: (0..memories).map(memory_export).collect(),
        globals,
        has_start: start.is_some(),
    };
    for (i, name) in layout.memories.iter().enumerate() {
        export_section.export(name, ExportKind::Memory, i as u32);
    }
    for (name, _) in &layout.globals {
        let index: u32 = name[RESERVED_PREFIX.len() + "global_".len()..]
            .parse()
            .expect("our own name");
        export_section.export(name, ExportKind::Global, index);
    }
    if let Some(f) = start {
        export_section.export(START_EXPORT, ExportKind::Func, f);
    }

    let mut out = wasm_encoder::Module::new();
    for (id, range) in &sections {
        if *id == wasm_encoder::SectionId::Start as u8 {
            continue;
        }
        if *id == wasm_encoder::SectionId::Export as u8 {
            out.section(&export_section);
            continue;
        }
        out.section(&RawSection {
            id: *id,
            data: &module[range.clone()],
        });
    }
    let bytes = out.finish();
    // The rewrite must itself be valid: a failure here is our bug, said plainly.
    Validator::new_with_features(WasmFeatures::default())
        .validate_all(&bytes)
        .map_err(|e| {
            Refused(format!(
                "internal error: the rewritten module is invalid: {e}"
            ))
        })?;
    Ok(Rewritten { bytes, layout })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_encoder::{
        CodeSection, ConstExpr, EntityType, FunctionSection, GlobalSection, GlobalType,
        ImportSection, Instruction, MemorySection, MemoryType, Module, StartSection, TableSection,
        TableType, TypeSection, ValType as EVal,
    };

    /// A module with one memory, one mutable i32 global, a `run` function with `body`,
    /// optional imports and extra sections.
    fn module(
        imports: Option<ImportSection>,
        mem: MemoryType,
        global: Option<GlobalType>,
        body: &[Instruction],
        start: bool,
        export_name: &str,
    ) -> Vec<u8> {
        let mut m = Module::new();
        let mut types = TypeSection::new();
        types.ty().function([], []);
        m.section(&types);
        let imported = imports.as_ref().map(|i| i.len()).unwrap_or(0);
        if let Some(i) = &imports {
            m.section(i);
        }
        let mut funcs = FunctionSection::new();
        funcs.function(0);
        m.section(&funcs);
        let mut tables = TableSection::new();
        tables.table(TableType {
            element_type: wasm_encoder::RefType::FUNCREF,
            table64: false,
            minimum: 1,
            maximum: None,
            shared: false,
        });
        m.section(&tables);
        let mut mems = MemorySection::new();
        mems.memory(mem);
        m.section(&mems);
        let mut globals = GlobalSection::new();
        if let Some(g) = global {
            let init = if g.val_type == EVal::I32 {
                ConstExpr::i32_const(0)
            } else {
                ConstExpr::ref_null(wasm_encoder::HeapType::EXTERN)
            };
            globals.global(g, &init);
        }
        m.section(&globals);
        let mut exports = wasm_encoder::ExportSection::new();
        exports.export(export_name, wasm_encoder::ExportKind::Func, imported);
        m.section(&exports);
        if start {
            m.section(&StartSection {
                function_index: imported,
            });
        }
        let mut code = CodeSection::new();
        let mut f = wasm_encoder::Function::new([]);
        for i in body {
            f.instruction(i);
        }
        f.instruction(&Instruction::End);
        code.function(&f);
        m.section(&code);
        m.finish()
    }

    fn mem() -> MemoryType {
        MemoryType {
            minimum: 1,
            maximum: Some(2),
            memory64: false,
            shared: false,
            page_size_log2: None,
        }
    }

    fn i32_global() -> Option<GlobalType> {
        Some(GlobalType {
            val_type: EVal::I32,
            mutable: true,
            shared: false,
        })
    }

    #[test]
    fn exports_state_and_moves_start() {
        let set = [Instruction::I32Const(1), Instruction::GlobalSet(0)];
        let bytes = module(None, mem(), i32_global(), &set, true, "run");
        let rw = rewrite(&bytes).unwrap();
        assert_eq!(rw.layout.memories, vec!["__avail_memory_0"]);
        assert_eq!(
            rw.layout.globals,
            vec![("__avail_global_0".to_string(), GlobalKind::I32)]
        );
        assert!(rw.layout.has_start);
        // The start function no longer runs on instantiation; the export runs it.
        let engine = wasmtime::Engine::default();
        let m = wasmtime::Module::new(&engine, &rw.bytes).unwrap();
        let mut store = wasmtime::Store::new(&engine, ());
        let inst = wasmtime::Instance::new(&mut store, &m, &[]).unwrap();
        let g = inst.get_global(&mut store, "__avail_global_0").unwrap();
        assert_eq!(g.get(&mut store).i32(), Some(0));
        inst.get_func(&mut store, START_EXPORT)
            .unwrap()
            .call(&mut store, &[], &mut [])
            .unwrap();
        assert_eq!(g.get(&mut store).i32(), Some(1));
        assert!(
            inst.get_func(&mut store, "run").is_some(),
            "original exports kept"
        );
    }

    #[test]
    fn refuses_gc_types() {
        let mut m = Module::new();
        let mut types = TypeSection::new();
        types.ty().struct_(vec![wasm_encoder::FieldType {
            element_type: wasm_encoder::StorageType::Val(EVal::I32),
            mutable: true,
        }]);
        m.section(&types);
        let err = rewrite(&m.finish()).unwrap_err().0;
        assert!(err.contains("GC types"), "{err}");
    }

    #[test]
    fn refuses_what_cannot_be_captured() {
        let shared = MemoryType {
            shared: true,
            ..mem()
        };
        let mut foreign = ImportSection::new();
        foreign.import("env", "f", EntityType::Function(0));
        let mut avail = ImportSection::new();
        avail.import("avail", "log", EntityType::Function(0));
        let extern_global = Some(GlobalType {
            val_type: EVal::Ref(wasm_encoder::RefType::EXTERNREF),
            mutable: true,
            shared: false,
        });
        let table_set = [
            Instruction::I32Const(0),
            Instruction::RefNull(wasm_encoder::HeapType::FUNC),
            Instruction::TableSet(0),
        ];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                module(None, shared, i32_global(), &[], false, "run"),
                "shared memory",
            ),
            (
                module(None, mem(), extern_global, &[], false, "run"),
                "reference",
            ),
            (
                module(None, mem(), i32_global(), &table_set, false, "run"),
                "table.set",
            ),
            (
                module(Some(foreign), mem(), i32_global(), &[], false, "run"),
                "env.f",
            ),
            (
                module(None, mem(), i32_global(), &[], false, "__avail_memory_0"),
                "reserved",
            ),
            (b"not wasm".to_vec(), "invalid module"),
        ];
        for (bytes, why) in cases {
            let e = rewrite(&bytes).unwrap_err();
            assert!(e.0.contains(why), "expected {why:?} in {e}");
        }
        // An import of the avail ABI is fine.
        rewrite(&module(Some(avail), mem(), i32_global(), &[], false, "run")).unwrap();
    }
}
