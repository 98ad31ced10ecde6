"""Mail path after the SMTP server: durable spool, binding assignment, delivery, mmove, mailq.

The daemon uses :func:`duravip.mail.service.serve` and the
:class:`duravip.mail.service.MailService` it reports; see ``docs/mail.md``.
"""
