// The demo page in a real Chromium: two users (two browser profiles) chat on each transport.
import type { Page } from 'playwright-core';
import { describe, expect, it } from 'vitest';
import { screenshotPath, Server, until, useServerAndBrowser } from './harness';

const env = useServerAndBrowser();

async function signedIn(user: string, transport: string): Promise<Page> {
  const context = await env.browser.newContext({ viewport: { width: 1100, height: 640 } });
  const page = await context.newPage();
  await page.goto(`${env.server.url}/demo/?user=${user}&transport=${transport}`);
  await page.locator(`#status[data-state="connected"][data-transport="${transport}"]`).waitFor();
  await page.locator('#messages li').first().waitFor();
  return page;
}

async function say(page: Page, text: string): Promise<void> {
  await page.fill('#text', text);
  await page.click('#composer button');
}

async function badge(page: Page, room: string, text: string): Promise<void> {
  const el = page.locator(`#conversations li[data-id="${room}"] .badge`);
  await until(`badge ${JSON.stringify(text)} on ${room}`, async () => (await el.textContent()) === text, 10_000);
}

describe('the demo page', () => {
  for (const transport of ['ws', 'sse', 'poll']) {
    it(`two users exchange messages over ${transport}`, async () => {
      const alice = await signedIn(`alice-${transport}`, transport);
      const bob = await signedIn(`bob-${transport}`, transport);
      await say(alice, `hello from alice over ${transport}`);
      await bob.locator('#messages li .text', { hasText: `hello from alice over ${transport}` }).waitFor();
      await say(bob, `hi alice, bob here (${transport})`);
      await alice.locator('#messages li .text', { hasText: `hi alice, bob here (${transport})` }).waitFor();
      // Each message shows once on each side.
      for (const page of [alice, bob]) {
        expect(await page.locator('#messages li .text', { hasText: `hello from alice over ${transport}` }).count()).toBe(1);
      }

      // A message in another conversation shows as an unread badge in the list.
      const room = `orders-${transport}`;
      await env.server.inner('create_conversation', {
        conversation_id: room,
        conversation_type: 1,
        members: [`alice-${transport}`, `bob-${transport}`],
        title: `Order 1042 (${transport})`,
      });
      await bob.locator(`#conversations li[data-id="${room}"]`).waitFor();
      await env.server.inner('send_msg', { conversation_id: room, from: `alice-${transport}`, type: 1, content: 'Is it still available?' });
      await env.server.inner('send_msg', { conversation_id: room, from: `alice-${transport}`, type: 1, content: 'I can pick it up today.' });
      await badge(bob, room, '2');
      if (transport === 'ws') {
        await say(alice, 'see you at 6?');
        await bob.locator('#messages li .text', { hasText: 'see you at 6?' }).waitFor();
        await bob.screenshot({ path: screenshotPath('demo-chat.png') });
      }
      // Opening it reads it: the badge goes.
      await bob.click(`#conversations li[data-id="${room}"]`);
      await bob.locator('#messages li .text', { hasText: 'I can pick it up today.' }).waitFor();
      await badge(bob, room, '');
      await alice.context().close();
      await bob.context().close();
    });
  }
});

describe('the demo page without demo tokens', () => {
  it('asks for a token from the backend and signs in with it', async () => {
    const bare = await Server.start({ QUICKIM_DEMO_TOKENS: 'false' });
    try {
      await bare.inner('create_conversation', { conversation_id: 'desk', conversation_type: 1, members: ['agent'], title: 'Help desk' });
      const { token } = await bare.inner('get_token', { user_id: 'agent', platform: 'web' });
      const page = await (await env.browser.newContext()).newPage();
      await page.goto(`${bare.url}/demo/`);
      await page.locator('#token').waitFor({ state: 'visible' });
      expect(await page.locator('#user').isHidden()).toBe(true);
      await page.fill('#token', token);
      await page.click('#signin button[type="submit"]');
      await page.locator('#status[data-state="connected"]').waitFor();
      await page.locator('#conversations li[data-id="desk"]').waitFor();
      await bare.inner('send_msg', { conversation_id: 'desk', from: '', type: 1, content: 'ticket #7 opened' });
      await page.locator('#messages li .text', { hasText: 'ticket #7 opened' }).waitFor();
      await page.context().close();
    } finally {
      await bare.stop();
    }
  });
});
