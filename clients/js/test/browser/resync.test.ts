// A cursor past the replay window gets `resync`, never a partial replay: the client surfaces
// it with a helper that reloads the conversation list over HTTP, then goes on live.
import { describe, expect, it } from 'vitest';
import { gotIds, pageClient, recorded, sleep, until, useServerAndBrowser } from './harness';

const env = useServerAndBrowser({ QUICKIM_REPLAY_RETENTION_S: '2' });

describe('resync', () => {
  it('reloads over HTTP when the cursor is past retention, then continues live', async () => {
    const user = 'sleeper';
    const room = 'room-resync';
    await env.server.inner('create_conversation', { conversation_id: room, conversation_type: 1, members: [user, 'sender'] });
    const page = await (await env.browser.newContext()).newPage();
    await page.goto(`${env.server.url}/demo/`);
    // The cursor is kept in localStorage, as a page that reloads would keep it.
    await pageClient(page, { user, transports: ['ws'], storage: true });
    await until('connected', async () => (await recorded(page)).state === 'connected');
    const early = await env.server.sendMany(room, 'sender', 'early', 3);
    await until('the early messages', async () => (await gotIds(page, room)).length === 3);
    await page.evaluate(() => (window as any).t.client.disconnect());

    // Away for longer than replay_retention_s, while more is sent.
    const missed = await env.server.sendMany(room, 'sender', 'missed', 5);
    await sleep(3_500);
    await pageClient(page, { user, transports: ['ws'], storage: true });
    await until('the resync', async () => (await recorded(page)).reloaded !== undefined, 15_000);
    const r = await recorded(page);
    expect(r.resyncs).toEqual(['cursor_expired']);
    const row = r.reloaded?.find((c) => c.conversation_id === room);
    expect(row?.last_msg_id).toBe(missed[missed.length - 1]);
    // Nothing was replayed partially: the new client got none of the old messages as events.
    expect(await gotIds(page, room)).toEqual([]);

    // Live from the resync's cursor on.
    const later = await env.server.sendMany(room, 'sender', 'later', 3);
    await until('live after the resync', async () => (await gotIds(page, room)).length === 3);
    expect(await gotIds(page, room)).toEqual(later);
    expect(early.length).toBe(3);
    await page.context().close();
  });
});
