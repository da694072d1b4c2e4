//! Pickled task results, the plain-data subset: what `pickle` (protocols 0 to 5) writes for
//! None, booleans, integers, floats, strings, bytes, lists, tuples and dicts, as JSON.
//!
//! A result comes from outside, so the decoder is built for hostile input: no recursion (the
//! pickle machine's stack is a vector), values at most [`MAX_DEPTH`] deep, at most
//! [`MAX_OUTPUT`] bytes of output however often one string is referenced again, and anything
//! that is not plain data (objects, globals, sets, a container referenced twice) refused.

use super::serialize::DecodeError;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Deepest nesting of lists, tuples and dicts accepted.
pub const MAX_DEPTH: u32 = 64;
/// Most bytes of decoded output (strings, and 16 per value).
pub const MAX_OUTPUT: usize = 64 * 1024 * 1024;

/// An item of the pickle machine's stack.
enum Item {
    Mark,
    Value { v: Value, depth: u32 },
}

/// A memo entry: a plain value that may be pushed again, or a container that may not.
enum Memo {
    Plain(Value),
    Container,
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u64, Memo>,
    output: usize,
}

fn invalid(why: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(format!("pickle: {}", why.into()))
}

/// Decodes a pickle of plain data into JSON.
pub fn decode(input: &[u8]) -> Result<Value, DecodeError> {
    let mut m = Machine {
        input,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        output: 0,
    };
    loop {
        let op = m.byte()?;
        match op {
            0x80 => {
                m.take(1)?; // PROTO
            }
            0x95 => {
                m.take(8)?; // FRAME: a length hint
            }
            b'.' => return m.pop_value().map(|(v, _)| v),
            b'N' => m.push(Value::Null)?,
            0x88 => m.push(Value::Bool(true))?,
            0x89 => m.push(Value::Bool(false))?,
            b'J' => {
                let n = i32::from_le_bytes(m.array()?);
                m.push(n.into())?;
            }
            b'K' => {
                let n = m.byte()?;
                m.push(n.into())?;
            }
            b'M' => {
                let n = u16::from_le_bytes(m.array()?);
                m.push(n.into())?;
            }
            0x8a | 0x8b => {
                let len = if op == 0x8a {
                    usize::from(m.byte()?)
                } else {
                    u32::from_le_bytes(m.array()?) as usize
                };
                let v = long(m.take(len)?)?;
                m.push(v)?;
            }
            b'I' | b'L' => {
                let line = m.line()?;
                let text = line.strip_suffix(b"L").unwrap_or(line);
                let v = match text {
                    b"01" if op == b'I' => Value::Bool(true),
                    b"00" if op == b'I' => Value::Bool(false),
                    _ => std::str::from_utf8(text)
                        .ok()
                        .and_then(|t| t.parse::<i64>().ok())
                        .ok_or_else(|| invalid("an integer that is not a number"))?
                        .into(),
                };
                m.push(v)?;
            }
            b'G' => {
                let f = f64::from_be_bytes(m.array()?);
                m.push(float(f))?;
            }
            b'F' => {
                let line = m.line()?;
                let f = std::str::from_utf8(line)
                    .ok()
                    .and_then(|t| t.parse::<f64>().ok())
                    .ok_or_else(|| invalid("a float that is not a number"))?;
                m.push(float(f))?;
            }
            0x8c | b'X' | 0x8d | b'C' | b'B' | 0x8e | 0x96 | b'U' | b'T' => {
                let len = match op {
                    0x8c | b'C' | b'U' => usize::from(m.byte()?),
                    b'X' | b'B' | b'T' => u32::from_le_bytes(m.array()?) as usize,
                    _ => usize::try_from(u64::from_le_bytes(m.array()?))
                        .map_err(|_| invalid("a length beyond the input"))?,
                };
                let bytes = m.take(len)?;
                let text = String::from_utf8_lossy(bytes).into_owned();
                m.push(Value::String(text))?;
            }
            b']' => m.push(Value::Array(Vec::new()))?,
            b')' => m.push(Value::Array(Vec::new()))?,
            b'}' => m.push(Value::Object(Map::new()))?,
            b'(' => m.stack.push(Item::Mark),
            b'a' => {
                let item = m.pop_value()?;
                m.extend_top(vec![item])?;
            }
            b'e' => {
                let items = m.pop_to_mark()?;
                m.extend_top(items)?;
            }
            b'l' | b't' => {
                let items = m.pop_to_mark()?;
                m.push_container(Value::Array(Vec::new()), items)?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let at = m
                    .stack
                    .len()
                    .checked_sub(n)
                    .ok_or_else(|| invalid("a tuple of missing items"))?;
                let items = m.stack.split_off(at);
                let items = items
                    .into_iter()
                    .map(|i| match i {
                        Item::Value { v, depth } => Ok((v, depth)),
                        Item::Mark => Err(invalid("a mark inside a tuple")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                m.push_container(Value::Array(Vec::new()), items)?;
            }
            b's' => {
                let value = m.pop_value()?;
                let key = m.pop_value()?;
                m.extend_top(vec![key, value])?;
            }
            b'u' => {
                let items = m.pop_to_mark()?;
                m.extend_top(items)?;
            }
            b'd' => {
                let items = m.pop_to_mark()?;
                m.push_container(Value::Object(Map::new()), items)?;
            }
            0x94 | b'q' | b'r' | b'p' => {
                let id = match op {
                    0x94 => m.memo.len() as u64,
                    b'q' => u64::from(m.byte()?),
                    b'r' => u64::from(u32::from_le_bytes(m.array()?)),
                    _ => m.line_number()?,
                };
                let entry = match m.stack.last() {
                    Some(Item::Value {
                        v: Value::Array(_) | Value::Object(_),
                        ..
                    }) => Memo::Container,
                    Some(Item::Value { v, .. }) => Memo::Plain(v.clone()),
                    _ => return Err(invalid("nothing to memoize")),
                };
                m.memo.insert(id, entry);
            }
            b'h' | b'j' | b'g' => {
                let id = match op {
                    b'h' => u64::from(m.byte()?),
                    b'j' => u64::from(u32::from_le_bytes(m.array()?)),
                    _ => m.line_number()?,
                };
                let v = match m.memo.get(&id) {
                    Some(Memo::Plain(v)) => v.clone(),
                    Some(Memo::Container) => {
                        return Err(invalid("a container referenced twice is not plain data"))
                    }
                    None => return Err(invalid("a reference to nothing")),
                };
                m.push(v)?;
            }
            b'0' => {
                m.stack.pop().ok_or_else(|| invalid("pop of nothing"))?;
            }
            b'1' => {
                m.pop_to_mark()?;
            }
            b'2' => {
                let top = match m.stack.last() {
                    Some(Item::Value {
                        v: v @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_)),
                        depth,
                    }) => (v.clone(), *depth),
                    _ => return Err(invalid("a duplicated container is not plain data")),
                };
                m.push(top.0)?;
            }
            other => {
                return Err(invalid(format!(
                    "opcode 0x{other:02x} is not plain data (objects, globals and sets are refused)"
                )))
            }
        }
    }
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.input.len())
            .ok_or_else(|| invalid("cut short"))?;
        let bytes = &self.input[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("N bytes taken"))
    }

    /// A text argument, up to its newline.
    fn line(&mut self) -> Result<&[u8], DecodeError> {
        let rest = &self.input[self.pos..];
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| invalid("a line without its end"))?;
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    fn line_number(&mut self) -> Result<u64, DecodeError> {
        let line = self.line()?;
        std::str::from_utf8(line)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| invalid("a memo number that is not a number"))
    }

    /// Counts `v` against the output budget.
    fn spend(&mut self, v: &Value) -> Result<(), DecodeError> {
        let cost = 16 + if let Value::String(s) = v { s.len() } else { 0 };
        self.output = self.output.saturating_add(cost);
        if self.output > MAX_OUTPUT {
            return Err(invalid(format!(
                "larger than {} MiB decoded",
                MAX_OUTPUT / (1024 * 1024)
            )));
        }
        Ok(())
    }

    fn push(&mut self, v: Value) -> Result<(), DecodeError> {
        self.spend(&v)?;
        self.stack.push(Item::Value { v, depth: 0 });
        Ok(())
    }

    fn pop_value(&mut self) -> Result<(Value, u32), DecodeError> {
        match self.stack.pop() {
            Some(Item::Value { v, depth }) => Ok((v, depth)),
            _ => Err(invalid("a value expected")),
        }
    }

    fn pop_to_mark(&mut self) -> Result<Vec<(Value, u32)>, DecodeError> {
        let mark = self
            .stack
            .iter()
            .rposition(|i| matches!(i, Item::Mark))
            .ok_or_else(|| invalid("no mark"))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .filter_map(|i| match i {
                Item::Value { v, depth } => Some((v, depth)),
                Item::Mark => None,
            })
            .collect())
    }

    /// A new container holding `items` (pairs of key and value for a dict).
    fn push_container(
        &mut self,
        empty: Value,
        items: Vec<(Value, u32)>,
    ) -> Result<(), DecodeError> {
        self.push(empty)?;
        self.extend_top(items)
    }

    /// Adds `items` to the container on top of the stack (pairs for a dict).
    fn extend_top(&mut self, items: Vec<(Value, u32)>) -> Result<(), DecodeError> {
        let Some(Item::Value { v, depth }) = self.stack.last_mut() else {
            return Err(invalid("no container to add to"));
        };
        let deepest = items.iter().map(|(_, d)| *d).max().unwrap_or(0);
        *depth = (*depth).max(deepest + 1);
        if *depth > MAX_DEPTH {
            return Err(invalid(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        match v {
            Value::Array(a) => a.extend(items.into_iter().map(|(v, _)| v)),
            Value::Object(o) => {
                if !items.len().is_multiple_of(2) {
                    return Err(invalid("a dict item without its value"));
                }
                let mut items = items.into_iter();
                while let (Some((k, _)), Some((v, _))) = (items.next(), items.next()) {
                    o.insert(key(k)?, v);
                }
            }
            _ => return Err(invalid("adding to something that is not a container")),
        }
        Ok(())
    }
}

/// A dict key as JSON can hold it.
fn key(k: Value) -> Result<String, DecodeError> {
    match k {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok("null".into()),
        _ => Err(invalid("a dict key that JSON cannot hold")),
    }
}

fn float(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// A little-endian two's-complement integer (`LONG1`, `LONG4`).
fn long(bytes: &[u8]) -> Result<Value, DecodeError> {
    if bytes.len() > 8 {
        return Err(invalid("an integer beyond 64 bits"));
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut buf = [if negative { 0xff } else { 0 }; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(buf).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn plain_values_written_by_python_decode() {
        // pickle.dumps("hello", 4) and pickle.dumps({"a": 1}, 4), as dill writes them.
        assert_eq!(
            decode(&hex("80049509000000000000008c0568656c6c6f942e")).unwrap(),
            json!("hello")
        );
        assert_eq!(
            decode(&hex("8004950a000000000000007d948c0161944b01732e")).unwrap(),
            json!({"a": 1})
        );
        // pickle.dumps([1, -2, 3.5, None, True, (1, 2), {"k": [b"x"]}, 2**40], 2)
        let v = decode(
            b"\x80\x02]q\x00(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88K\x01K\x02\x86q\x01}q\x02X\x01\x00\x00\x00kq\x03]q\x04C\x01xq\x05asq\x06\x8a\x06\x00\x00\x00\x00\x00\x01e.",
        )
        .unwrap();
        assert_eq!(
            v,
            json!([1, -2, 3.5, null, true, [1, 2], {"k": ["x"]}, 1u64 << 40])
        );
    }

    #[test]
    fn hostile_pickles_are_refused_not_followed() {
        // 100,000 nested lists: far deeper than any stack would survive recursively.
        let mut deep = b"\x80\x02".to_vec();
        deep.extend(std::iter::repeat_n(b']', 100_000));
        deep.extend(std::iter::repeat_n(b'a', 99_999));
        deep.push(b'.');
        let e = decode(&deep).unwrap_err();
        assert!(e.to_string().contains("deeper than 64"), "{e}");
        // A string referenced again and again cannot grow without bound.
        let mut amplified = b"\x80\x02X\x00\x00\x10\x00".to_vec();
        amplified.extend(std::iter::repeat_n(b'y', 1 << 20));
        amplified.extend(b"q\x00(");
        amplified.extend(std::iter::repeat_n(&b"h\x00"[..], 100).flatten());
        amplified.extend(b"l.");
        let e = decode(&amplified).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // A container referenced twice, an object, truncated input.
        assert!(decode(b"\x80\x02]q\x00h\x00\x86.").is_err());
        assert!(decode(b"\x80\x02cos\nsystem\n.").is_err());
        assert!(decode(b"\x80\x02X\xff\xff\xff\xffab").is_err());
        assert!(decode(b"").is_err());
    }
}
