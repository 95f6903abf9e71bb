// The JavaScript side of bench_tokenizer: encodes the Brown corpus text with the npm reference tokenizers and prints
// one JSON line per engine: {"vocab", "engine", "mb_per_s", "tokens"}. Usage: node bench_tokenizer_ref.mjs ROOT
// (ROOT/node_modules and ROOT/refs/brown.txt are made by tests/tokenizer/setup_refs.sh).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const root = path.resolve(process.argv[2]);
const require = createRequire(path.join(root, 'package.json'));
const text = fs.readFileSync(path.join(root, 'refs', 'brown.txt'), 'utf8');
const megabytes = Buffer.byteLength(text, 'utf8') / 1e6;
const reps = Number(process.argv[3] ?? 3);

function time(vocab, engine, encode) {
  let tokens = encode(text).length;  // warm-up (JIT, caches), also the token count
  const times = [];
  for (let r = 0; r < reps; ++r) {
    const t0 = process.hrtime.bigint();
    tokens = encode(text).length;
    times.push(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  times.sort((a, b) => a - b);
  console.log(JSON.stringify({ vocab, engine, mb_per_s: megabytes / times[Math.floor(times.length / 2)], tokens }));
}

const { get_encoding } = require('tiktoken');
for (const [vocab, name] of [['cl100k', 'cl100k_base'], ['o200k', 'o200k_base'], ['r50k', 'r50k_base']]) {
  const gpt = require(`gpt-tokenizer/cjs/encoding/${name}`);
  time(vocab, 'gpt-tokenizer', (s) => gpt.encode(s, { disallowedSpecial: new Set() }));
  const wasm = get_encoding(name);
  time(vocab, 'tiktoken-wasm', (s) => wasm.encode(s, [], []));
  wasm.free();
}
const { llama3Tokenizer } = require('llama3-tokenizer-js/bundle/commonjs-llama3-tokenizer-with-baked-data.cjs');
time('llama3', 'llama3-tokenizer-js', (s) => llama3Tokenizer.encode(s, { bos: false, eos: false }));
