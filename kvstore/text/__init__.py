"""Documents -> clean text -> token ids: file readers, the chat-template layout, splitting into parts."""
