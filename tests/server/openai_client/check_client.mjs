// Runs the official OpenAI client against a mamba3 server on 127.0.0.1:PORT (started with --alias golden
// --api-key test-key). Exits non-zero on the first failed check.
import OpenAI from 'openai';

const port = process.argv[2];
const baseURL = `http://127.0.0.1:${port}/v1`;
const client = new OpenAI({ baseURL, apiKey: 'test-key', maxRetries: 0, timeout: 120000 });

function check(cond, what, detail) {
  if (!cond) {
    console.error(`FAIL: ${what}`, detail === undefined ? '' : JSON.stringify(detail));
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}

const models = await client.models.list();
check(models.data.length === 1 && models.data[0].id === 'golden', 'models.list', models.data);

const c = await client.completions.create({ model: 'golden', prompt: 'Hello', max_tokens: 8, seed: 1 });
check(c.object === 'text_completion' && c.choices.length === 1 && typeof c.choices[0].text === 'string', 'completion', c);
check(c.choices[0].finish_reason === 'length' && c.usage.completion_tokens === 8 && c.usage.prompt_tokens === 5,
      'completion usage', c.usage);

const messages = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi there' }];
const chat = await client.chat.completions.create({ model: 'golden', messages, max_tokens: 6, seed: 2 });
check(chat.object === 'chat.completion' && chat.choices[0].message.role === 'assistant' &&
      typeof chat.choices[0].message.content === 'string', 'chat completion', chat);

const stream = await client.completions.create({ model: 'golden', prompt: 'Hello', max_tokens: 8, seed: 1, stream: true });
let text = '', finish = null;
for await (const chunk of stream) {
  for (const ch of chunk.choices) {
    text += ch.text;
    if (ch.finish_reason) finish = ch.finish_reason;
  }
}
check(text === c.choices[0].text && finish === 'length', 'streamed completion equals the non-streamed one',
      { text, expected: c.choices[0].text, finish });

const chatStream = await client.chat.completions.create({ model: 'golden', messages, max_tokens: 6, seed: 2, stream: true,
                                                          stream_options: { include_usage: true } });
let chatText = '', usage = null;
for await (const chunk of chatStream) {
  for (const ch of chunk.choices) chatText += ch.delta?.content ?? '';
  if (chunk.usage) usage = chunk.usage;
}
check(chatText === chat.choices[0].message.content, 'streamed chat equals the non-streamed one',
      { chatText, expected: chat.choices[0].message.content });
check(usage && usage.completion_tokens === chat.usage.completion_tokens, 'streamed chat usage', usage);

try {
  await client.completions.create({ model: 'golden', prompt: 'x', temperature: 9 });
  check(false, 'a bad temperature is refused');
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.status === 400 && /temperature/.test(e.message),
        'a bad temperature is a 400 BadRequestError', { status: e.status, message: e.message });
}
const stranger = new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 });
try {
  await stranger.completions.create({ model: 'golden', prompt: 'x', max_tokens: 2 });
  check(false, 'a wrong key is refused');
} catch (e) {
  check(e instanceof OpenAI.AuthenticationError && e.status === 401, 'a wrong key is a 401 AuthenticationError',
        { status: e.status, message: e.message });
}
