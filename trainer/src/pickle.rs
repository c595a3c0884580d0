//! A Python pickle reader for the data `torch.save` writes (protocol 2, as torch writes it,
//! and the binary opcodes of protocols up to 5): the state dicts of OLMo's checkpoints.
//!
//! It runs the pickle machine without running Python: a call of a global it does not know
//! (a `pathlib.PosixPath`, numpy's RNG state) becomes an opaque [`Value::Object`] that the
//! caller may ignore, and only the calls that make containers and tensors are understood.
//! Persistent ids (torch's storages) are handed to the caller's `persistent` function.

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{anyhow, bail, Result};

/// A Python value. Lists and dicts are shared, as in Python: a pickle fills a container
/// after memoising it, and a later reference must see it filled.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for `i64` (little-endian two's complement bytes).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// `module.name`, a class or function.
    Global(String, String),
    /// What calling `callable(*args)` made, with the state `BUILD` gave it: kept, not run.
    /// Shared like containers, since `BUILD` comes after the object is memoised.
    Object(Rc<Object>),
    /// What the caller's `persistent` function made of a persistent id.
    Storage(crate::torch_file::Storage),
    Tensor(crate::torch_file::TensorRef),
}

impl Value {
    pub fn list(items: Vec<Value>) -> Value {
        Value::List(Rc::new(RefCell::new(items)))
    }

    pub fn dict(items: Vec<(Value, Value)>) -> Value {
        Value::Dict(Rc::new(RefCell::new(items)))
    }

    /// The value under string key `key` of a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }

    /// A dict's entries, or a list's or tuple's items as `(index, item)`.
    pub fn entries(&self) -> Vec<(Value, Value)> {
        match self {
            Value::Dict(d) => d.borrow().clone(),
            Value::List(l) => enumerate(&l.borrow()),
            Value::Tuple(t) => enumerate(t),
            _ => Vec::new(),
        }
    }

    /// The items of a list or tuple.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::List(l) => Some(l.borrow().clone()),
            Value::Tuple(t) => Some(t.clone()),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// A non-negative int as a size or an index.
    pub fn as_usize(&self) -> Option<usize> {
        self.as_int().and_then(|i| usize::try_from(i).ok())
    }

    /// The sizes a list or tuple of ints holds, or a `torch.Size` (pickled as a call of it
    /// with such a list).
    pub fn usizes(&self) -> Option<Vec<usize>> {
        let items = match self {
            Value::Object(o) if matches!(&o.callable, Value::Global(m, n) if m == "torch" && n == "Size") => {
                o.args.items()?.first()?.items()?
            }
            _ => self.items()?,
        };
        items.iter().map(Value::as_usize).collect()
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A string or a number as it reads, anything else by its kind: safe in an error message
    /// (a damaged pickle can make a list that holds itself, which `{:?}` would follow forever).
    pub fn brief(&self) -> String {
        match self {
            Value::Str(s) => format!("{s:?}"),
            Value::Int(i) => i.to_string(),
            Value::Float(x) => x.to_string(),
            other => other.kind(),
        }
    }

    /// What kind of value this is, for an error message.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) | Value::BigInt(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(m, n) => format!("{m}.{n}"),
            Value::Object(o) => format!("a {} object", o.callable.kind()),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
        }
    }
}

#[derive(Debug)]
pub struct Object {
    pub callable: Value,
    pub args: Value,
    pub state: RefCell<Option<Value>>,
}

impl Value {
    fn object(callable: Value, args: Value) -> Value {
        Value::Object(Rc::new(Object {
            callable,
            args,
            state: RefCell::new(None),
        }))
    }

    /// An attribute of an object built from its state (a dataclass's `__dict__`, or the
    /// slots of a `(dict, slots)` state).
    pub fn attr(&self, name: &str) -> Option<Value> {
        let Value::Object(o) = self else {
            return None;
        };
        let state = o.state.borrow();
        match state.as_ref()? {
            d @ Value::Dict(_) => d.get(name),
            Value::Tuple(t) => t.iter().find_map(|d| d.get(name)),
            _ => None,
        }
    }

    /// The arguments an opaque object was made with.
    pub fn args(&self) -> Option<Value> {
        match self {
            Value::Object(o) => Some(o.args.clone()),
            _ => None,
        }
    }
}

fn enumerate(items: &[Value]) -> Vec<(Value, Value)> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| (Value::Int(i as i64), v.clone()))
        .collect()
}

/// The pickle machine's stack, with the positions of its marks.
struct Machine<'a> {
    data: &'a [u8],
    at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| anyhow!("the pickle ends inside an argument at byte {}", self.at))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn len(&mut self, n: u64) -> Result<usize> {
        usize::try_from(n).map_err(|_| anyhow!("a length of {n} at byte {}", self.at))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.at..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("an unterminated line at byte {}", self.at))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.at += n + 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> Result<Value> {
        let at = self.at;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map(Value::Str)
            .map_err(|_| anyhow!("a string that is not UTF-8 at byte {at}"))
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack
            .pop()
            .ok_or_else(|| anyhow!("the pickle pops an empty stack at byte {}", self.at))
    }

    fn top(&mut self) -> Result<&mut Value> {
        let at = self.at;
        self.stack
            .last_mut()
            .ok_or_else(|| anyhow!("the pickle reads an empty stack at byte {at}"))
    }

    /// The values above the last mark, the mark removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("no mark to pop at byte {}", self.at))?;
        if m > self.stack.len() {
            bail!("a mark above the stack at byte {}", self.at);
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, i: u32) -> Result<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| anyhow!("memo entry {i} read before it was written"))
    }

    fn memo_put(&mut self, i: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| anyhow!("memoising an empty stack at byte {}", self.at))?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            bail!("an odd number of dict items at byte {}", self.at);
        }
        let at = self.at;
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            // setting items of an object kept opaque: nothing the reader needs
            Value::Object(_) => Ok(()),
            other => bail!("setting items of {} at byte {at}", other.kind()),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        let at = self.at;
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            Value::Object(_) => Ok(()),
            other => bail!("appending to {} at byte {at}", other.kind()),
        }
    }
}

/// What a call of global `module.name` with these arguments makes, or `None` to keep it
/// opaque.
pub type Call<'a> = &'a dyn Fn(&str, &str, &Value) -> Result<Option<Value>>;

/// Runs the pickle in `data` and returns the value it builds. `persistent` turns a persistent
/// id (torch's storage tuple) into a value; `call` builds what calls of globals make.
pub fn load(
    data: &[u8],
    persistent: &mut dyn FnMut(Value) -> Result<Value>,
    call: Call,
) -> Result<Value> {
    let mut m = Machine {
        data,
        at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Default::default(),
    };
    loop {
        let at = m.at;
        let op = m
            .u8()
            .map_err(|_| anyhow!("the pickle ends without STOP"))?;
        match op {
            0x80 => {
                let proto = m.u8()?;
                if proto > 5 {
                    bail!("pickle protocol {proto} (5 is the newest this reads)");
                }
            }
            0x95 => {
                m.u64()?; // FRAME: a length hint
            }
            b'.' => return m.pop(),
            b'(' => m.marks.push(m.stack.len()),
            b'0' => {
                m.pop()?;
            }
            b'1' => {
                m.pop_mark()?;
            }
            b'2' => {
                let v = m.top()?.clone();
                m.stack.push(v);
            }
            b'N' => m.stack.push(Value::None),
            0x88 => m.stack.push(Value::Bool(true)),
            0x89 => m.stack.push(Value::Bool(false)),
            b'J' => {
                let v = m.u32()? as i32;
                m.stack.push(Value::Int(v as i64));
            }
            b'K' => {
                let v = m.u8()?;
                m.stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = m.u16()?;
                m.stack.push(Value::Int(v as i64));
            }
            0x8a | 0x8b => {
                let n = match op {
                    0x8a => m.u8()? as u64,
                    _ => m.u32()? as i32 as u64,
                };
                let n = m.len(n)?;
                let bytes = m.take(n)?;
                m.stack.push(long(bytes));
            }
            b'G' => {
                let v = f64::from_be_bytes(m.take(8)?.try_into().unwrap());
                m.stack.push(Value::Float(v));
            }
            b'X' => {
                let n = m.u32()? as u64;
                let n = m.len(n)?;
                let v = m.text(n)?;
                m.stack.push(v);
            }
            0x8c => {
                let n = m.u8()? as usize;
                let v = m.text(n)?;
                m.stack.push(v);
            }
            0x8d => {
                let n = m.u64()?;
                let n = m.len(n)?;
                let v = m.text(n)?;
                m.stack.push(v);
            }
            // Python 2 strings: bytes, read as Latin-1 text
            b'T' | b'U' => {
                let n = match op {
                    b'T' => m.u32()? as u64,
                    _ => m.u8()? as u64,
                };
                let n = m.len(n)?;
                let s = m.take(n)?.iter().map(|&b| b as char).collect();
                m.stack.push(Value::Str(s));
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => m.u32()? as u64,
                    b'C' => m.u8()? as u64,
                    _ => m.u64()?,
                };
                let n = m.len(n)?;
                let bytes = m.take(n)?.to_vec();
                m.stack.push(Value::Bytes(bytes));
            }
            b')' => m.stack.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = m.pop_mark()?;
                m.stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if m.stack.len() < n {
                    bail!("a tuple of {n} from a shorter stack at byte {at}");
                }
                let items = m.stack.split_off(m.stack.len() - n);
                m.stack.push(Value::Tuple(items));
            }
            b']' => m.stack.push(Value::list(Vec::new())),
            b'l' => {
                let items = m.pop_mark()?;
                m.stack.push(Value::list(items));
            }
            b'a' => {
                let v = m.pop()?;
                m.append(vec![v])?;
            }
            b'e' => {
                let items = m.pop_mark()?;
                m.append(items)?;
            }
            b'}' => m.stack.push(Value::dict(Vec::new())),
            b'd' => {
                let items = m.pop_mark()?;
                m.stack.push(Value::dict(Vec::new()));
                m.set_items(items)?;
            }
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                m.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = m.pop_mark()?;
                m.set_items(items)?;
            }
            // sets: kept as lists
            0x8f => m.stack.push(Value::list(Vec::new())),
            0x90 => {
                let items = m.pop_mark()?;
                m.append(items)?;
            }
            0x91 => {
                let items = m.pop_mark()?;
                m.stack.push(Value::list(items));
            }
            b'c' => {
                let module = m.line()?;
                let name = m.line()?;
                m.stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = m.pop()?;
                let module = m.pop()?;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => {
                        m.stack.push(Value::Global(module, name))
                    }
                    _ => bail!("STACK_GLOBAL of non-strings at byte {at}"),
                }
            }
            b'R' | 0x81 => {
                let args = m.pop()?;
                let callable = m.pop()?;
                let made = match &callable {
                    Value::Global(module, name) => call(module, name, &args)
                        .map_err(|e| anyhow!("{module}.{name} at byte {at}: {e}"))?,
                    _ => None,
                };
                m.stack
                    .push(made.unwrap_or_else(|| Value::object(callable, args)));
            }
            0x92 => {
                let kwargs = m.pop()?;
                let args = m.pop()?;
                let callable = m.pop()?;
                m.stack
                    .push(Value::object(callable, Value::Tuple(vec![args, kwargs])));
            }
            b'b' => {
                let s = m.pop()?;
                // a tensor's or container's state (a Parameter's attributes, a dict's
                // __dict__) means nothing to the reader; an opaque object keeps it
                if let Value::Object(o) = m.top()? {
                    *o.state.borrow_mut() = Some(s);
                }
            }
            b'Q' => {
                let pid = m.pop()?;
                let v = persistent(pid).map_err(|e| anyhow!("persistent id at byte {at}: {e}"))?;
                m.stack.push(v);
            }
            b'q' => {
                let i = m.u8()? as u32;
                m.memo_put(i)?;
            }
            b'r' => {
                let i = m.u32()?;
                m.memo_put(i)?;
            }
            0x94 => {
                let i = m.memo.len() as u32;
                m.memo_put(i)?;
            }
            b'h' => {
                let i = m.u8()? as u32;
                let v = m.memo_get(i)?;
                m.stack.push(v);
            }
            b'j' => {
                let i = m.u32()?;
                let v = m.memo_get(i)?;
                m.stack.push(v);
            }
            _ => bail!(
                "pickle opcode 0x{op:02x} ({:?}) at byte {at} is not one torch.save writes",
                op as char
            ),
        }
    }
}

/// A LONG1/LONG4 argument: little-endian two's complement.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::BigInt(bytes.to_vec());
    }
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut full = [if negative { 0xff } else { 0 }; 8];
    full[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(full))
}

/// Pickles `v` as `torch.save` would (protocol 2), each tensor over its own storage, which
/// `persistent_id` names as torch does; returns an error for what torch.save would not write
/// from a state dict (opaque objects, bare storages).
pub fn dump(v: &Value, out: &mut Vec<u8>) -> Result<()> {
    out.extend(b"\x80\x02");
    write(v, out)?;
    out.push(b'.');
    Ok(())
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn write_global(module: &str, name: &str, out: &mut Vec<u8>) {
    out.push(b'c');
    out.extend(module.as_bytes());
    out.push(b'\n');
    out.extend(name.as_bytes());
    out.push(b'\n');
}

fn write_int(i: i64, out: &mut Vec<u8>) {
    match i {
        0..=0xff => out.extend([b'K', i as u8]),
        0x100..=0xffff => {
            out.push(b'M');
            out.extend((i as u16).to_le_bytes());
        }
        _ if i32::try_from(i).is_ok() => {
            out.push(b'J');
            out.extend((i as i32).to_le_bytes());
        }
        _ => {
            out.extend([0x8a, 8]);
            out.extend(i.to_le_bytes());
        }
    }
}

fn write_ints(items: &[usize], out: &mut Vec<u8>) {
    out.push(b'(');
    for &i in items {
        write_int(i as i64, out);
    }
    out.push(b't');
}

fn write(v: &Value, out: &mut Vec<u8>) -> Result<()> {
    match v {
        Value::None => out.push(b'N'),
        Value::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Value::Int(i) => write_int(*i, out),
        Value::Float(x) => {
            out.push(b'G');
            out.extend(x.to_be_bytes());
        }
        Value::Str(s) => write_str(s, out),
        Value::Tuple(items) => {
            out.push(b'(');
            for i in items {
                write(i, out)?;
            }
            out.push(b't');
        }
        Value::List(items) => {
            out.extend(b"](");
            for i in items.borrow().iter() {
                write(i, out)?;
            }
            out.push(b'e');
        }
        Value::Dict(items) => {
            out.extend(b"}(");
            for (k, v) in items.borrow().iter() {
                write(k, out)?;
                write(v, out)?;
            }
            out.push(b'u');
        }
        Value::Tensor(t) => {
            let class = match t.storage.dtype {
                crate::torch_file::Dtype::F32 => "FloatStorage",
                other => bail!("writing {other:?} tensors"),
            };
            write_global("torch._utils", "_rebuild_tensor_v2", out);
            out.extend(b"((");
            write_str("storage", out);
            write_global("torch", class, out);
            write_str(&t.storage.key, out);
            write_str("cpu", out);
            write_int(t.numel() as i64, out);
            out.extend(b"tQ");
            write_int(t.offset as i64, out);
            write_ints(&t.shape, out);
            write_ints(&t.stride, out);
            out.push(0x89);
            write_global("collections", "OrderedDict", out);
            out.extend(b")Rt");
            out.push(b'R');
        }
        other => bail!("pickling {}", other.kind()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(data: &[u8]) -> Result<Value> {
        load(data, &mut |_| bail!("no persistent ids"), &|_, _, _| {
            Ok(None)
        })
    }

    #[test]
    fn containers_filled_after_memoising_are_seen_filled() {
        // [l, l] where l = [1] is memoised empty, then appended to: both items see the 1
        // outer list (memo 0), MARK, inner list (memo 1), get 1, APPENDS: outer = [l, l];
        // then get 1, append 1 to it, pop it
        let p = b"\x80\x02]q\x00(]q\x01h\x01eh\x01K\x01a0.";
        let v = run(p).unwrap();
        let items = v.items().unwrap();
        assert_eq!(items.len(), 2);
        for i in items {
            let inner = i.items().unwrap();
            assert_eq!(inner.len(), 1, "{inner:?}");
            assert_eq!(inner[0].as_int(), Some(1));
        }
    }

    #[test]
    fn integers_of_every_width_and_sign() {
        // (BININT1 200, BININT2 40000, BININT -5, LONG1 2**40, LONG1 -2**63, LONG1 of 9 bytes)
        let mut p = b"\x80\x02(K\xc8M\x40\x9cJ\xfb\xff\xff\xff".to_vec();
        p.extend(b"\x8a\x06\x00\x00\x00\x00\x00\x01");
        p.extend(b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80");
        p.extend(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01t.");
        let v = run(&p).unwrap().items().unwrap();
        let ints: Vec<Option<i64>> = v.iter().map(|x| x.as_int()).collect();
        assert_eq!(
            ints[..5],
            [
                Some(200),
                Some(40000),
                Some(-5),
                Some(1 << 40),
                Some(i64::MIN)
            ]
        );
        assert!(matches!(v[5], Value::BigInt(_)));
    }

    #[test]
    fn broken_pickles_are_errors_not_panics() {
        for (p, want) in [
            (&b"\x80\x02K"[..], "ends inside"),
            (b"\x80\x02K\x01", "without STOP"),
            (b"\x80\x02h\x05.", "memo entry 5"),
            (b"\x80\x02a.", "empty stack"),
            (b"\x80\x02K\x01K\x02K\x03s.", "setting items of an int"),
            (b"\x80\x02\xff.", "opcode 0xff"),
            (b"\x80\x02X\xff\xff\xff\xff", "ends inside"),
            (b"\x80\x02Q.", "empty stack"),
            (b"\x80\x09.", "protocol 9"),
        ] {
            let e = format!("{:#}", run(p).unwrap_err());
            assert!(e.contains(want), "{p:?}: want `{want}` in: {e}");
        }
    }
}
