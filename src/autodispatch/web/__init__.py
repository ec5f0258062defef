"""The pages: mechanic dashboard, customer, admin and realtime probe, with their static
JS and CSS (plain ES modules, no build step) and the mechanics' service worker."""
