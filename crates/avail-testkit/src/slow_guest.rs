//! A guest whose handler takes as long as a test wants, made with `wasm-encoder` (no
//! wasm target is needed to build it): the slow and runaway guests of the `ft` tests.
//!
//! Guest ABI v1, one memory page, no data but a counter, importing only `avail.now_ms`:
//! - `GET` (any path) answers `200` at once; the body is the counter, 8 bytes
//!   little-endian.
//! - any other method first adds one to the counter (so a call that is interrupted
//!   leaves its mark in the state), then busy-waits until `avail.now_ms` has moved
//!   `handler_ms` on, then answers like `GET`. [`RUNAWAY`] never finishes: only the
//!   handler deadline (`timeout_ms`) ends it.
//!
//! The counter is the body of the response, which lives at [`RESPONSE_AT`]:
//! `u32 status = 200 | u32 header_count = 0 | u32 body_len = 8 | u64 counter`.

use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, DataSection, EntityType, ExportKind, ExportSection,
    Function, FunctionSection, ImportSection, Instruction, MemArg, MemorySection, MemoryType,
    Module, TypeSection, ValType,
};

/// A handler time that never ends (the deadline stops it).
pub const RUNAWAY: u64 = i64::MAX as u64;
/// Where the encoded response lives in the guest's memory.
const RESPONSE_AT: u32 = 16;
/// Length of the encoded response.
const RESPONSE_LEN: u32 = 20;
/// The counter: the response's body.
const COUNTER_AT: u32 = RESPONSE_AT + 12;
/// The request buffer `avail_alloc` hands out (the rest of the page).
const REQUEST_AT: i32 = 1024;

/// The module: writes take `handler_ms` (see the module docs).
pub fn module(handler_ms: u64) -> Vec<u8> {
    let mut m = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32], [ValType::I32]); // 0: avail_alloc
    types
        .ty()
        .function([ValType::I32, ValType::I32], [ValType::I64]); // 1: avail_handle
    types.ty().function([], [ValType::I64]); // 2: avail.now_ms
    m.section(&types);
    let mut imports = ImportSection::new();
    imports.import("avail", "now_ms", EntityType::Function(2));
    m.section(&imports);
    // Function 0 is the import.
    let mut funcs = FunctionSection::new();
    funcs.function(0); // 1: avail_alloc
    funcs.function(1); // 2: avail_handle
    m.section(&funcs);
    let mut mems = MemorySection::new();
    mems.memory(MemoryType {
        minimum: 1,
        maximum: Some(1),
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    m.section(&mems);
    let mut exports = ExportSection::new();
    exports.export("memory", ExportKind::Memory, 0);
    exports.export("avail_alloc", ExportKind::Func, 1);
    exports.export("avail_handle", ExportKind::Func, 2);
    m.section(&exports);

    let mut code = CodeSection::new();
    let mut alloc = Function::new([]);
    alloc
        .instruction(&Instruction::I32Const(REQUEST_AT))
        .instruction(&Instruction::End);
    code.function(&alloc);

    let word = |offset: u32, align: u32| MemArg {
        offset: u64::from(offset),
        align,
        memory_index: 0,
    };
    // Parameters 0 (request pointer) and 1 (length); local 2: when the wait began.
    let mut handle = Function::new([(1, ValType::I64)]);
    let respond = ((u64::from(RESPONSE_AT) << 32) | u64::from(RESPONSE_LEN)) as i64;
    handle
        // The request opens with the method's length: 3 is "GET".
        .instruction(&Instruction::LocalGet(0))
        .instruction(&Instruction::I32Load(word(0, 2)))
        .instruction(&Instruction::I32Const(3))
        .instruction(&Instruction::I32Eq)
        .instruction(&Instruction::If(BlockType::Empty))
        .instruction(&Instruction::I64Const(respond))
        .instruction(&Instruction::Return)
        .instruction(&Instruction::End)
        // counter += 1
        .instruction(&Instruction::I32Const(0))
        .instruction(&Instruction::I32Const(0))
        .instruction(&Instruction::I64Load(word(COUNTER_AT, 3)))
        .instruction(&Instruction::I64Const(1))
        .instruction(&Instruction::I64Add)
        .instruction(&Instruction::I64Store(word(COUNTER_AT, 3)))
        // start = now_ms(); loop until now_ms() - start >= handler_ms
        .instruction(&Instruction::Call(0))
        .instruction(&Instruction::LocalSet(2))
        .instruction(&Instruction::Block(BlockType::Empty))
        .instruction(&Instruction::Loop(BlockType::Empty))
        .instruction(&Instruction::Call(0))
        .instruction(&Instruction::LocalGet(2))
        .instruction(&Instruction::I64Sub)
        .instruction(&Instruction::I64Const(handler_ms.min(RUNAWAY) as i64))
        .instruction(&Instruction::I64GeS)
        .instruction(&Instruction::BrIf(1))
        .instruction(&Instruction::Br(0))
        .instruction(&Instruction::End)
        .instruction(&Instruction::End)
        .instruction(&Instruction::I64Const(respond))
        .instruction(&Instruction::End);
    code.function(&handle);
    m.section(&code);

    // The response's fixed head: status 200, no headers, an 8-byte body (the counter).
    let mut head = Vec::new();
    for v in [200u32, 0, 8] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    let mut data = DataSection::new();
    data.active(0, &ConstExpr::i32_const(RESPONSE_AT as i32), head);
    m.section(&data);
    m.finish()
}

/// The counter in a reply's body.
pub fn counter(body: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(body.try_into().ok()?))
}
