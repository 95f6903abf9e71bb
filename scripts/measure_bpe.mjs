#!/usr/bin/env node
// How much a small byte-level BPE vocabulary would shorten the default model's text: trains BPE merges on
// train.txt (words split off as GPT-2 does, roughly: an optional space then letters, digits, or other symbols) and
// reports bytes per token on validation.txt for a few vocabulary sizes. Used for the tokenizer choice documented in
// models/default/README.md; deterministic (ties between equally frequent pairs go to the smaller pair of ids).
// Usage: node scripts/measure_bpe.mjs CORPUS_DIR [VOCAB ...]      (default vocabularies: 512 1024 2048 4096)
import fs from 'node:fs';
import path from 'node:path';

const WORD = / ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+/g;

function wordCounts(text) {
  const counts = new Map();
  for (const m of text.matchAll(WORD)) counts.set(m[0], (counts.get(m[0]) || 0) + 1);
  return counts;
}

function trainMerges(counts, nMerges) {
  const words = [];
  const freq = [];
  for (const [w, c] of counts) {
    words.push(Array.from(Buffer.from(w, 'utf8')));
    freq.push(c);
  }
  const key = (a, b) => a * 1048576 + b;
  const pairCount = new Map();
  const pairWords = new Map();
  const addWord = (i, sign) => {
    const w = words[i];
    for (let j = 0; j + 1 < w.length; ++j) {
      const k = key(w[j], w[j + 1]);
      pairCount.set(k, (pairCount.get(k) || 0) + sign * freq[i]);
      if (sign > 0) {
        let s = pairWords.get(k);
        if (!s) pairWords.set(k, (s = new Set()));
        s.add(i);
      }
    }
  };
  for (let i = 0; i < words.length; ++i) addWord(i, +1);
  const merges = [];
  for (let m = 0; m < nMerges; ++m) {
    let best = -1;
    let bestCount = 0;
    for (const [k, c] of pairCount) {
      if (c > bestCount || (c === bestCount && c > 0 && k < best)) {
        best = k;
        bestCount = c;
      }
    }
    if (bestCount <= 0) break;
    const a = Math.floor(best / 1048576);
    const b = best % 1048576;
    const id = 256 + m;
    merges.push([a, b]);
    for (const i of pairWords.get(best) || []) {
      addWord(i, -1);
      const w = words[i];
      const out = [];
      for (let j = 0; j < w.length; ++j) {
        if (j + 1 < w.length && w[j] === a && w[j + 1] === b) {
          out.push(id);
          ++j;
        } else out.push(w[j]);
      }
      words[i] = out;
      addWord(i, +1);
    }
    pairWords.delete(best);
    pairCount.delete(best);
  }
  return merges;
}

// Tokens of `text` under the first `n` merges (applied in rank order, as byte-level BPE encodes).
function countTokens(counts, merges, n) {
  const rank = new Map();
  merges.slice(0, n).forEach(([a, b], r) => rank.set(a * 1048576 + b, r));
  let tokens = 0;
  for (const [w, c] of counts) {
    let s = Array.from(Buffer.from(w, 'utf8'));
    for (;;) {
      let bestR = Infinity;
      let at = -1;
      for (let j = 0; j + 1 < s.length; ++j) {
        const r = rank.get(s[j] * 1048576 + s[j + 1]);
        if (r !== undefined && r < bestR) {
          bestR = r;
          at = j;
        }
      }
      if (at < 0) break;
      s = [...s.slice(0, at), 256 + bestR, ...s.slice(at + 2)];
    }
    tokens += s.length * c;
  }
  return tokens;
}

const [dir, ...vocabArgs] = process.argv.slice(2);
if (!dir) {
  process.stderr.write('usage: node scripts/measure_bpe.mjs CORPUS_DIR [VOCAB ...]\n');
  process.exit(2);
}
const vocabs = (vocabArgs.length ? vocabArgs : ['512', '1024', '2048', '4096']).map(Number).sort((x, y) => x - y);
const train = fs.readFileSync(path.join(dir, 'train.txt'), 'utf8');
const val = fs.readFileSync(path.join(dir, 'validation.txt'), 'utf8');
const merges = trainMerges(wordCounts(train), vocabs[vocabs.length - 1] - 256);
const valCounts = wordCounts(val);
const valBytes = Buffer.byteLength(val);
console.log('| vocabulary | validation tokens | bytes per token |');
console.log('|---|---|---|');
console.log(`| 256 (bytes) | ${valBytes} | 1.00 |`);
for (const v of vocabs) {
  const t = countTokens(valCounts, merges, v - 256);
  console.log(`| ${v} | ${t} | ${(valBytes / t).toFixed(2)} |`);
}
