#!/bin/sh
# LocalStack runs this when it is ready: the SNS topic inferstream alerts
# go to, and an SQS queue subscribed to it so the alerts can be read back
# (`awslocal sqs receive-message --queue-url .../inferstream-alerts-inbox`).
set -e
awslocal sns create-topic --name inferstream-alerts
awslocal sqs create-queue --queue-name inferstream-alerts-inbox
awslocal sns subscribe \
  --topic-arn arn:aws:sns:us-east-1:000000000000:inferstream-alerts \
  --protocol sqs \
  --notification-endpoint arn:aws:sqs:us-east-1:000000000000:inferstream-alerts-inbox
